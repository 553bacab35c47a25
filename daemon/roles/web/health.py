"""GET /healthz, /readyz and /metrics.

/healthz says the process serves requests (nothing else: a load balancer must
not restart us because PostgreSQL blinked). /readyz checks the database and
the queue backend, each under a short deadline, and names what failed. The
database check is a write (a one-row write transaction): a database that
answers reads but refuses writes (a full disk) is not ready.
/metrics is the Prometheus text of every campaignd process, plus queue depths
computed at scrape time.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import falcon
from prometheus_client.core import GaugeMetricFamily

from daemon import metrics
from daemon.store.db import is_postgres
from daemon.store.models import Lease
from daemon.store.models import database
from daemon.store.models import utcnow
from daemon.store.queue import Queues

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0


class Probe:
    """Runs named checks in background threads, each awaited for a deadline.

    A check still running from an earlier call (a hung connect) is awaited
    again instead of started twice, so slow backends cannot pile up threads.
    """

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")
        self._lock = threading.Lock()
        self._running: dict[str, Future] = {}

    def run(self, name: str, check: Callable[[], object]) -> tuple[bool, object]:
        """(True, result) or (False, "why it failed")."""
        with self._lock:
            future = self._running.get(name)
            if future is None or future.done():
                future = self._pool.submit(check)
                self._running[name] = future
        try:
            return True, future.result(timeout=self.timeout_s)
        except FutureTimeout:
            return False, f"no answer within {self.timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# The row the readiness probe writes: one per host, never expiring (so the
# lock cleanup leaves it alone), its value the time of the last probe.
PROBE_LEASE = f"readyz:{socket.gethostname()}"[:120]


def check_database() -> bool:
    """Write one row in a write transaction (BEGIN IMMEDIATE on SQLite)."""
    # Runs in a probe thread: its own connection, closed right after.
    with database.connection_context(), database.atomic():
        if is_postgres():
            timeout_ms = int(CHECK_TIMEOUT_S * 1000)
            database.execute_sql(f"SET LOCAL statement_timeout = {timeout_ms}")
        now = utcnow()
        Lease.insert(name=PROBE_LEASE, value=now.isoformat()).on_conflict(
            conflict_target=[Lease.name], update={Lease.value: now.isoformat()}
        ).execute()
    return True


class Healthz:
    """GET /healthz: 200 while the process serves requests."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    """GET /readyz: 200 when the database and the queue answer, else 503."""

    def __init__(self, probe: Probe, queues: Queues | None):
        self.probe = probe
        self.queues = queues

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks = {}
        db_ok, db_detail = self.probe.run("database", check_database)
        checks["database"] = "ok" if db_ok else db_detail
        if self.queues is None:
            queue_ok, queue_detail = False, "no queue configured"
        else:
            queue_ok, queue_detail = self.probe.run("queue", self.queues.depths)
        checks["queue"] = "ok" if queue_ok else queue_detail
        ready = db_ok and queue_ok
        if not ready:
            failed = [name for name, value in checks.items() if value != "ok"]
            log.warning("not ready: %s", checks)
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", "5")
            checks["failed"] = failed
        resp.media = {"status": "ok" if ready else "unavailable", "checks": checks}


class QueueDepthCollector:
    """Prometheus collector: depth of every queue, read at scrape time."""

    def __init__(self, probe: Probe, queues: Queues | None):
        self.probe = probe
        self.queues = queues

    def collect(self):
        up = GaugeMetricFamily(
            "campaignd_queue_up", "1 when the queue backend answered this scrape."
        )
        depth = GaugeMetricFamily(
            "campaignd_queue_depth",
            "Tasks waiting (pending + scheduled) per queue.",
            labels=["queue"],
        )
        ok, depths = (
            self.probe.run("queue", self.queues.depths)
            if self.queues is not None
            else (False, None)
        )
        up.add_metric([], 1.0 if ok else 0.0)
        if ok:
            for name, value in depths.items():
                depth.add_metric([name], float(value))
        yield up
        yield depth


def count_unsettled() -> tuple[int, int]:
    """(dead-letter webhook events, unconfirmed sends), in one probe."""
    # Runs in a probe thread: its own connection, closed right after.
    from daemon.domain import unconfirmed
    from daemon.domain.events import dead_count

    with database.connection_context():
        return dead_count(), unconfirmed.count()


class UnsettledCollector:
    """Prometheus collector of row counts read at scrape time (so every web
    process reports the same value): webhook events that are dead letters,
    and sends whose outcome is unknown. Absent from a scrape whose database
    did not answer."""

    def __init__(self, probe: Probe):
        self.probe = probe

    def collect(self):
        ok, counts = self.probe.run("unsettled", count_unsettled)
        if not ok:
            return
        dead = GaugeMetricFamily(
            "campaignd_webhook_events_dead",
            "Stored webhook events that failed processing "
            "web.event_max_attempts times (dead letters), not replayed.",
        )
        dead.add_metric([], float(counts[0]))
        yield dead
        unsure = GaugeMetricFamily(
            "campaignd_messages_unconfirmed",
            "Sends whose request may have reached the provider and that wait "
            "for evidence (a status webhook or a reply) before "
            "provider.unconfirmed applies.",
        )
        unsure.add_metric([], float(counts[1]))
        yield unsure


class Metrics:
    """GET /metrics: Prometheus text format."""

    def __init__(self, probe: Probe, queues: Queues | None):
        self.collector = QueueDepthCollector(probe, queues)
        self.unsettled = UnsettledCollector(probe)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = metrics.CONTENT_TYPE
        resp.data = metrics.render([self.collector, self.unsettled])
