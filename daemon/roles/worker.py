"""The worker role: one Huey consumer (thread workers) for one queue.

``campaignd worker --queue NAME`` runs it in the foreground; the supervisor
runs it as ``campaignd child worker:NAME``. SIGTERM is the graceful signal
(in-flight tasks finish within the stop timeout); SIGHUP is ignored, because
Huey's default re-execs ``sys.argv``, which is not what a supervised child
should do on its own.

SIGTERM drains the worker, whoever sends it (shutdown, restart, RSS
recycling, a task past the hard limit): `Tasks.draining` is set before Huey's
stop flag, so a send task dequeued from then on claims nothing and puts its
id back on the queue; the running tasks get `daemon.stop_timeout_s` - 2 s to
finish and record, then the process exits, leaving behind only a task that
is stuck (its in-flight record tells the supervisor what to do with its row).
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from huey.consumer import Consumer

from daemon.app.tasks import Tasks
from daemon.config import Config
from daemon.runtime import Heartbeat
from daemon.runtime import TaskClock
from daemon.runtime import die_with_parent
from daemon.runtime import parent_alive
from daemon.runtime import setup_logging
from daemon.store.db import open_database
from daemon.store.queue import listen_for_wakeups
from daemon.store.queue import make_queues

log = logging.getLogger(__name__)


class HeartbeatConsumer(Consumer):
    """A Huey consumer whose main loop also beats the supervisor's heartbeat."""

    def __init__(
        self,
        huey,
        heartbeat,
        task_clock: TaskClock,
        interval: float,
        draining: threading.Event | None = None,
        **kw,
    ):
        super().__init__(huey, **kw)
        self._heartbeat = heartbeat
        self._task_clock = task_clock
        self.draining = draining if draining is not None else threading.Event()
        self._beat_every = interval
        self._next_beat = 0.0
        # Huey maps SIGHUP to "re-exec sys.argv": never in a supervised child.
        self._signal_actions.pop(signal.SIGHUP, None)

    def loop(self, health_check_ts=None):
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self._beat_every
            if not parent_alive():
                log.warning("supervisor is gone; stopping")
                self.stop(graceful=True)
            if self._heartbeat is not None:
                oldest, running = self._task_clock.oldest()
                self._heartbeat.beat(oldest, running)
        return super().loop(health_check_ts)

    def stop(self, graceful=False):
        """Drain first: no task claims a send once this returns or waits."""
        if not self.draining.is_set():
            self.draining.set()
            _, running = self._task_clock.oldest()
            log.info(
                "stopping (%s): claiming nothing more, %d tasks running",
                "graceful" if graceful else "now",
                running,
            )
        # Threads waiting for an enqueue would hold the join up to a poll.
        self.stop_flag.set()
        stop_waiting = getattr(self.huey.storage, "stop_waiting", None)
        if stop_waiting is not None:
            stop_waiting()
        super().stop(graceful=graceful)


def threads_for(cfg: Config, queue: str) -> int:
    return {
        "messages": cfg.workers.messages_threads,
        "retry": cfg.workers.retry_threads,
        "verification": cfg.workers.verification_threads,
        "default": cfg.workers.default_threads,
    }[queue]


def build_consumer(cfg: Config, queue: str, tasks: Tasks, heartbeat=None):
    huey = tasks.queues.get(queue)
    # SQLite: idle threads wait for an enqueue's poke, polling every
    # queue.idle_poll_s only as a fallback (Redis and PostgreSQL block already).
    listen_for_wakeups(huey, cfg.queue.idle_poll_s)
    return HeartbeatConsumer(
        huey,
        heartbeat,
        tasks.task_clock,
        cfg.supervisor.heartbeat_interval_s,
        tasks.draining,
        workers=threads_for(cfg, queue),
        worker_type="thread",
        # Periodic jobs come from our scheduler role, not Huey's.
        periodic=False,
        initial_delay=cfg.queue.poll_initial_s,
        max_delay=cfg.queue.poll_max_s,
        backoff=1.15,
        check_worker_health=True,
        health_check_interval=5,
        # Leaves the supervisor time to SIGKILL before its own deadline.
        shutdown_timeout=max(cfg.daemon.stop_timeout_s - 2.0, 0.5),
        graceful_signal="TERM",
    )


def main(cfg: Config, queue: str) -> int:
    setup_logging(cfg.daemon.log_level, f"worker:{queue}")
    die_with_parent()
    # Idempotent and locked: a standalone worker may be the first to start.
    open_database(cfg, migrate_schema=True)
    if cfg.daemon.log_level != "debug":
        # Huey logs a line per task at INFO: 20 % of the send path's CPU.
        logging.getLogger("huey").setLevel(logging.WARNING)
    tasks = Tasks(cfg, make_queues(cfg))
    consumer = build_consumer(cfg, queue, tasks, Heartbeat.from_env())
    log.info("worker for queue %s started", queue)
    consumer.run()
    return 0
