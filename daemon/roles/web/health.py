"""GET /healthz, /readyz and /metrics.

/healthz says the process serves requests (nothing else: a load balancer must
not restart us because PostgreSQL blinked). /readyz checks the database and
the queue backend, each under a short deadline, and names what failed. The
database check is a write (a one-row write transaction): a database that
answers reads but refuses writes (a full disk) is not ready.
/metrics is the Prometheus text of every campaignd process, plus series
computed at scrape time: queue depths, the roles as the supervisor's status
socket sees them, row counts (messages by status and kind, dead letters,
unconfirmed sends, active alerts) and the scheduler leader. Each source is a
probe of its own under the same deadline: one that fails or hangs leaves its
series out of that scrape (the `..._up` gauges say so) and never fails the
scrape itself.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import falcon
import peewee as pw
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily

from daemon import __version__
from daemon import metrics
from daemon.status_client import request as status_request
from daemon.store.db import is_postgres
from daemon.store.models import Lease
from daemon.store.models import Message
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
        # One thread per source of /metrics and /readyz (queue, database,
        # unsettled, rows, supervisor, leader), so none waits for another.
        self._pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="probe")
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


# Row counts are taken at most this often per web process: how many
# scrapers ask, and how often, does not change the database's load.
ROWS_MAX_AGE_S = 30.0
# A count older than this (the database stopped answering) is not served.
ROWS_STALE_S = 120.0


def count_rows() -> tuple[list[tuple[int, str, int]], list[dict]]:
    """(message rows as (kind, status, count), active alerts), in one probe.

    GROUP BY kind, status with COUNT(*) reads only the (campaign, kind,
    status) index, never the table: tools/bench_metrics_rows.py measures it
    at a million rows.
    """
    # Runs in a probe thread: its own connection, closed right after.
    from daemon.domain.alerts import active_alerts

    with database.connection_context():
        rows = list(
            Message.select(Message.kind, Message.status, pw.fn.COUNT(pw.SQL("*")))
            .group_by(Message.kind, Message.status)
            .tuples()
        )
        return rows, active_alerts()


class RowsCollector:
    """Prometheus collector: messages by status and kind, and active alerts.

    Counted in a probe thread at most every ROWS_MAX_AGE_S and kept: a
    count slower than the probe's deadline is served from the next scrape
    on instead of being thrown away. Absent when the last count is older
    than ROWS_STALE_S (the database does not answer)."""

    def __init__(self, probe: Probe, clock: Callable[[], float] = time.monotonic):
        self.probe = probe
        self.clock = clock
        self._counted: tuple[float, tuple] | None = None

    def _count(self) -> tuple:
        found = count_rows()
        self._counted = (self.clock(), found)
        return found

    def collect(self):
        counted = self._counted
        if counted is None or self.clock() - counted[0] >= ROWS_MAX_AGE_S:
            self.probe.run("rows", self._count)
            counted = self._counted
        if counted is None or self.clock() - counted[0] > ROWS_STALE_S:
            return
        rows, alerts = counted[1]
        messages = GaugeMetricFamily(
            "campaignd_messages",
            "Message rows by status and kind (1 = Message 1, 2 = Message 2), "
            f"counted at most every {ROWS_MAX_AGE_S:g} s.",
            labels=["status", "kind"],
        )
        for kind, status, count in sorted(rows, key=lambda r: (str(r[1]), r[0])):
            messages.add_metric([str(status), str(kind)], float(count))
        yield messages
        active = GaugeMetricFamily(
            "campaignd_alerts_active", "Alerts raised and not resolved."
        )
        active.add_metric([], float(len(alerts)))
        yield active
        each = GaugeMetricFamily(
            "campaignd_alert_active",
            "1 per unresolved alert, by key and severity (the newest 100).",
            labels=["key", "severity"],
        )
        for alert in alerts:
            each.add_metric([alert["key"], alert["severity"]], 1.0)
        yield each


class SupervisorCollector:
    """Prometheus collector: the roles as the supervisor's status socket
    reports them, asked for the roles only (answered at once, no figures).
    `campaignd_supervisor_up` is 0 and no role series is written when the
    socket does not answer (a web role run alone, a supervisor gone)."""

    def __init__(self, probe: Probe, socket_path):
        self.probe = probe
        self.socket_path = socket_path

    def _ask(self) -> dict:
        answer = status_request(
            self.socket_path,
            {"cmd": "status", "figures": False},
            timeout=self.probe.timeout_s,
        )
        if not isinstance(answer, dict) or not isinstance(answer.get("roles"), list):
            raise ValueError(f"no status answer: {answer!r:.80}")
        return answer

    def collect(self):
        info = GaugeMetricFamily(
            "campaignd_build_info",
            "Always 1; the version of the campaignd serving this scrape.",
            labels=["version"],
        )
        info.add_metric([__version__], 1.0)
        yield info
        ok, answer = (
            self.probe.run("supervisor", self._ask)
            if self.socket_path is not None
            else (False, None)
        )
        up = GaugeMetricFamily(
            "campaignd_supervisor_up",
            "1 when the supervisor answered on its status socket this scrape.",
        )
        up.add_metric([], 1.0 if ok else 0.0)
        yield up
        if not ok:
            return
        role_up = GaugeMetricFamily(
            "campaignd_role_up", "1 when the role is RUNNING.", labels=["role"]
        )
        restarts = CounterMetricFamily(
            "campaignd_role_restarts",
            "Times the supervisor started the role again since it started.",
            labels=["role"],
        )
        rss = GaugeMetricFamily(
            "campaignd_role_rss_bytes",
            "Resident memory of the role's process (absent with no process).",
            labels=["role"],
        )
        beat = GaugeMetricFamily(
            "campaignd_role_heartbeat_age_seconds",
            "Age of the role's last heartbeat (absent with no process).",
            labels=["role"],
        )
        for role in answer["roles"]:
            name = str(role.get("name"))
            role_up.add_metric([name], 1.0 if role.get("state") == "RUNNING" else 0.0)
            restarts.add_metric([name], float(role.get("restarts") or 0))
            if role.get("rss_mb") is not None:
                rss.add_metric([name], float(role["rss_mb"]) * 1_048_576)
            if role.get("heartbeat_age_s") is not None:
                beat.add_metric([name], float(role["heartbeat_age_s"]))
        yield from (role_up, restarts, rss, beat)


class LeaderCollector:
    """Prometheus collector: who holds the scheduler's leader lease (the
    Redis key or the `lease` row), the same on every host."""

    def __init__(self, probe: Probe, cfg):
        self.probe = probe
        self.cfg = cfg

    def _holder(self):
        from daemon.roles import leader

        with database.connection_context():
            return leader.current_holder(self.cfg)

    def collect(self):
        if self.cfg is None:
            return
        ok, holder = self.probe.run("leader", self._holder)
        if not ok:
            return
        owner = GaugeMetricFamily(
            "campaignd_leader_info",
            "1 for the scheduler leader's owner id (host:pid:token); no "
            "sample while nobody holds the lease.",
            labels=["owner"],
        )
        if holder:
            owner.add_metric([str(holder)], 1.0)
        yield owner


class Metrics:
    """GET /metrics: Prometheus text format."""

    def __init__(self, probe: Probe, queues: Queues | None, cfg=None):
        self.collectors = [
            QueueDepthCollector(probe, queues),
            UnsettledCollector(probe),
            RowsCollector(probe),
            SupervisorCollector(probe, cfg.status_socket if cfg else None),
            LeaderCollector(probe, cfg),
        ]

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = metrics.CONTENT_TYPE
        resp.data = metrics.render(self.collectors)
