"""The worker role: Huey consumers (thread workers) for one queue or several.

``campaignd worker --queue NAME`` runs it in the foreground; the supervisor
runs it as ``campaignd child worker:NAME``. ``worker:background`` (the
default, `workers.shared_background`) consumes the default, retry and
verification queues in one process, a thread group per queue: one
`HeartbeatConsumer` runs the main loop (signals, heartbeat, health checks)
and starts and stops the others, its companions, which share its stop flag.
One scheduler thread (`SharedScheduler`) moves the due entries of every
queue's schedule onto its queue, instead of one thread per queue.

SIGTERM is the graceful signal (in-flight tasks finish within the stop
timeout); SIGHUP is ignored, because Huey's default re-execs ``sys.argv``,
which is not what a supervised child should do on its own.

SIGTERM drains the worker, whoever sends it (shutdown, restart, RSS
recycling, a task past the hard limit): `Tasks.draining` is set before Huey's
stop flag, so a send task dequeued from then on claims nothing and puts its
id back on the queue; the running tasks get `daemon.stop_timeout_s` - 2 s to
finish and record, then the process exits, leaving behind only a task that
is stuck (its in-flight record tells the supervisor what to do with its row).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

from huey.consumer import Consumer
from huey.consumer import Scheduler
from huey.consumer import ThreadEnvironment

from daemon.app.tasks import Tasks
from daemon.config import Config
from daemon.runtime import Heartbeat
from daemon.runtime import TaskClock
from daemon.runtime import die_with_parent
from daemon.runtime import parent_alive
from daemon.runtime import setup_logging
from daemon.runtime import supervised
from daemon.store.db import open_database
from daemon.store.queue import listen_for_wakeups
from daemon.store.queue import make_queues
from daemon.store.queue import tell_taken

log = logging.getLogger(__name__)


# What worker:background consumes, in one process.
BACKGROUND_QUEUES = ("default", "retry", "verification")


class _SharedStopFlag(ThreadEnvironment):
    """Thread workers whose stop flag is given: one flag stops a group."""

    def __init__(self, stop_flag: threading.Event, *args):
        super().__init__(*args)
        self.stop_flag = stop_flag

    def get_stop_flag(self):
        return self.stop_flag


class SharedScheduler(Scheduler):
    """Huey's scheduler for several queues: each second, the due entries of
    every queue's schedule go onto that queue.

    worker:background had a scheduler thread per queue: three threads, three
    queue connections opened before its first heartbeat (a respawn's time,
    W3) and three schedule reads a second while idle (W5).
    """

    def __init__(self, hueys, stop_flag, interval):
        super().__init__(hueys[0], stop_flag, interval, periodic=False)
        self.hueys = hueys

    def loop(self, now=None):
        started = self._next_loop
        self._next_loop += self.interval
        if self._next_loop < time.monotonic():
            # Huey's own rule: a late round is skipped, not run twice.
            self._next_loop = time.monotonic()
            return
        for huey in self.hueys:
            try:
                due = huey.read_schedule(now)
            except Exception:  # noqa: BLE001 - the other queues still run
                log.exception("reading the %s schedule failed", huey.name)
                continue
            for task in due:
                try:
                    huey.enqueue(task)
                except Exception:  # noqa: BLE001 - as Huey's scheduler does
                    log.exception("enqueueing %s failed", task)
        self.sleep_for_interval(started, self.interval)


class HeartbeatConsumer(Consumer):
    """A Huey consumer whose main loop also beats the supervisor's heartbeat.

    `companions` are consumers of other queues in this process (built with
    this one's `stop_flag`): started, health-checked and stopped with it.
    """

    def __init__(
        self,
        huey,
        heartbeat,
        task_clock: TaskClock,
        interval: float,
        draining: threading.Event | None = None,
        stop_flag: threading.Event | None = None,
        **kw,
    ):
        self._given_stop_flag = stop_flag
        super().__init__(huey, **kw)
        self.companions: list[HeartbeatConsumer] = []
        self._heartbeat = heartbeat
        self._task_clock = task_clock
        self.draining = draining if draining is not None else threading.Event()
        self._beat_every = interval
        self._next_beat = 0.0
        # Huey maps SIGHUP to "re-exec sys.argv": never in a supervised child.
        self._signal_actions.pop(signal.SIGHUP, None)
        # Huey's main loop waits 0.1 s on its stop flag: ten wake-ups a second
        # in every idle consumer. It waits in `_idle_wait` instead, until the
        # next heartbeat or a signal, and only glances at the flag.
        self._stop_flag_timeout = 0
        self._signal_r: int | None = None

    def get_environment(self, worker_type):
        if self._given_stop_flag is None:
            return super().get_environment(worker_type)
        return _SharedStopFlag(
            self._given_stop_flag, self._graceful_sig, self._interrupt_sig
        )

    def _create_scheduler(self):
        # Huey calls this in __init__ (no companions yet) and when its health
        # check finds the scheduler dead; `start` builds it again once the
        # companions are known.
        hueys = [self.huey, *(c.huey for c in getattr(self, "companions", ()))]
        return SharedScheduler(hueys, self.stop_flag, self.scheduler_interval)

    def start(self):
        if self.companions:
            self.scheduler = self._create_process(self._create_scheduler(), "Scheduler")
        for companion in self.companions:
            # The companions' queues are read by this consumer's scheduler.
            companion.scheduler = self.scheduler
            companion.start_threads()
        super().start()  # installs Huey's signal handlers
        # A signal writes a byte here, which ends `_idle_wait` at once: a
        # SIGTERM drains the worker without waiting for the next beat.
        self._signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)

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
        self._idle_wait(self._next_beat - time.monotonic())
        return super().loop(health_check_ts)

    def _idle_wait(self, timeout: float) -> None:
        if self._signal_r is None or self._signum is not None:
            return
        if self.stop_flag.is_set():
            return
        readable, _, _ = select.select([self._signal_r], [], [], max(timeout, 0))
        if readable:
            try:
                while os.read(self._signal_r, 64):
                    pass
            except BlockingIOError:
                pass

    def start_threads(self) -> None:
        """Start the worker threads only (a companion's start)."""
        for _, worker in self.worker_threads:
            worker.start()

    def check_worker_health(self):
        healthy = super().check_worker_health()  # restarts a dead scheduler
        for companion in self.companions:
            # Huey would start a scheduler of its own for a companion whose
            # scheduler it finds dead: point it at the live shared one.
            companion.scheduler = self.scheduler
            healthy = companion.check_worker_health() and healthy
        return healthy

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
        # Every queue's threads stop together (the flag is shared), and
        # threads waiting for an enqueue would hold the join up to a poll.
        self.stop_flag.set()
        for consumer in [self, *self.companions]:
            stop_waiting = getattr(consumer.huey.storage, "stop_waiting", None)
            if stop_waiting is not None:
                stop_waiting()
        deadline = time.monotonic() + (self.shutdown_timeout or 0)
        super().stop(graceful=graceful)
        for companion in self.companions:
            # One deadline for the whole process, not one per queue.
            companion.shutdown_timeout = max(deadline - time.monotonic(), 0.01)
            Consumer.stop(companion, graceful=graceful)
            companion.huey.notify_interrupted_tasks()


def threads_for(cfg: Config, queue: str) -> int:
    return {
        "messages": cfg.workers.messages_threads,
        "retry": cfg.workers.retry_threads,
        "verification": cfg.workers.verification_threads,
        "default": cfg.workers.default_threads,
    }[queue]


def build_consumer(
    cfg: Config, queue: str, tasks: Tasks, heartbeat=None, stop_flag=None
) -> HeartbeatConsumer:
    huey = tasks.queues.get(queue)
    # SQLite: idle threads wait for an enqueue's poke, polling every
    # queue.idle_poll_s only as a fallback (Redis and PostgreSQL block already).
    listen_for_wakeups(huey, cfg.queue.idle_poll_s)
    # Noted before Huey runs anything: a death after the pop replays it.
    tell_taken(huey, tasks.taken_noter(queue))
    return HeartbeatConsumer(
        huey,
        heartbeat,
        tasks.task_clock,
        cfg.supervisor.heartbeat_interval_s,
        tasks.draining,
        stop_flag,
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


def build_consumers(
    cfg: Config, queues: tuple[str, ...], tasks: Tasks, heartbeat=None
) -> HeartbeatConsumer:
    """The consumer of queues[0], with the others as its companions."""
    main = build_consumer(cfg, queues[0], tasks, heartbeat)
    main.companions = [
        build_consumer(cfg, queue, tasks, stop_flag=main.stop_flag)
        for queue in queues[1:]
    ]
    return main


def main(cfg: Config, queues: tuple[str, ...]) -> int:
    tag = queues[0] if len(queues) == 1 else "background"
    setup_logging(cfg.daemon.log_level, f"worker:{tag}")
    die_with_parent()
    # Idempotent and locked: a standalone worker may be the first to start.
    open_database(cfg, migrate_schema=not supervised())
    if cfg.daemon.log_level != "debug":
        # Huey logs a line per task at INFO: 20 % of the send path's CPU.
        logging.getLogger("huey").setLevel(logging.WARNING)
    tasks = Tasks(cfg, make_queues(cfg))
    consumer = build_consumers(cfg, queues, tasks, Heartbeat.from_env())
    log.info(
        "worker for %s %s started",
        "queues" if len(queues) > 1 else "queue",
        ", ".join(queues),
    )
    consumer.run()
    return 0
