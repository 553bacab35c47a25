"""Leases of dead processes: what the supervisor calls, wired by the CLI.

A worker killed mid-send leaves rows leased to it. Those it had on the wire
(its in-flight records) become unconfirmed; the others never left and are
queued again at once. The supervisor runs these through
`daemon.supervision.hooks.SupervisorHooks` and imports none of it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from dataclasses import field

from daemon.domain import unconfirmed
from daemon.domain.contacts import verification
from daemon.runtime import clear_inflight
from daemon.runtime import inflight_dir
from daemon.runtime import inflight_records_kept
from daemon.runtime import mark_inflight_boot
from daemon.runtime import read_inflight
from daemon.runtime import read_taken
from daemon.runtime import recorded_pids
from daemon.store.db import db_session
from daemon.store.db import is_postgres
from daemon.store.models import database
from daemon.store.models import utcnow

# Logged from the supervisor process, under its name.
log = logging.getLogger("daemon.supervision.supervisor")


@dataclass
class LeftBehind:
    """What the workers of a previous run (killed with its supervisor) left
    for this run to enqueue: their rows that never left, queued again, and
    the tasks their threads had taken off the queues (runtime.read_taken)."""

    requeued: list[tuple[int, int]] = field(default_factory=list)  # (id, priority)
    taken: set[tuple[str, int]] = field(default_factory=set)
    unconfirmed: int = 0  # rows made unconfirmed: counted once metrics can be

    def __bool__(self) -> bool:
        return bool(self.requeued or self.taken or self.unconfirmed)

    def add(self, other: LeftBehind) -> None:
        self.requeued += other.requeued
        self.taken |= other.taken
        self.unconfirmed += other.unconfirmed


def release_at_start(cfg) -> LeftBehind:
    """Release the leases this host's dead processes (a previous run) left.

    Workers SIGKILLed with the daemon left leases that would otherwise hold
    their rows until the lease expires; their in-flight records tell which
    requests may have left. Runs before any child starts, so no pid of a
    record file can belong to this run. What is to be enqueued again is
    returned: the queues are built later (`LeaseReleaser.prepare`).
    """
    import psutil

    directory = inflight_dir(cfg.data_path)
    for warning in durability_warnings():
        log.warning("%s", warning)
    kept = inflight_records_kept(directory)
    released = unconfirmed.release_dead_processes(
        socket.gethostname(),
        psutil.pid_exists,
        lambda pid: read_inflight(directory, pid) if kept else None,
    )
    if not kept and released.unconfirmed:
        log.warning(
            "the in-flight records of the previous run are gone (a reboot, or"
            " the runtime directory %s removed): the %d rows its dead workers"
            " held are unconfirmed, not sent again blindly",
            directory,
            released.unconfirmed,
        )
    left = LeftBehind(
        requeued=list(released.requeued), unconfirmed=released.unconfirmed
    )
    # Number checks whose time passed while the daemon was down: paced
    # again from now, not all run at once by the queue's entries now due
    # together. (Message 1 rows whose pacing slot passed take a new one
    # when they come: Pacer.slot_grace.)
    verification.respace_overdue(utcnow(), cfg.campaigns.verify_per_minute)
    for pid in recorded_pids(directory):
        # Records of another boot are a previous run's, whatever holds
        # their pid now.
        if not kept or not psutil.pid_exists(pid):
            left.taken |= read_taken(directory, pid)
            clear_inflight(directory, pid)
    mark_inflight_boot(directory, renew=not kept)
    if released.requeued or released.unconfirmed or left.taken:
        log.info(
            "dead processes of a previous run: %d rows queued again, "
            "%d unconfirmed, %d tasks they had taken",
            len(released.requeued),
            released.unconfirmed,
            len(left.taken),
        )
    return left


# PostgreSQL settings under which a server crash undoes commits it had
# acknowledged. The rows are campaignd's memory of what was sent: a Message 1
# recorded as sent that comes back `queued` goes out a second time.
_DURABILITY_SETTINGS = ("synchronous_commit", "fsync")


def durability_warnings() -> list[str]:
    """What the database's configuration lets a crash undo (PostgreSQL)."""
    if not is_postgres():
        return []
    found = []
    for name in _DURABILITY_SETTINGS:
        value = database.execute_sql(f"SHOW {name}").fetchone()[0]
        if str(value).lower() == "off":
            found.append(
                f"PostgreSQL has {name}=off: a server crash can undo commits "
                "already made, and a send recorded just before it can go out "
                "twice (docs/reliability.md, section on durability)"
            )
    return found


class LeaseReleaser:
    """Deals with a dead worker's leased rows (on the supervisor's DB thread).

    Its queues and tasks are built by `prepare`, which the supervisor runs in
    that thread at start: built at the first death instead, their imports
    (3-4 MB, tens of ms holding the GIL) slowed the first respawn. A SQLite
    or PostgreSQL queue opens its connection then (Huey creates its tables
    when the queue is built); a Redis queue connects at the first death.
    """

    def __init__(self, cfg, inflight_directory: str, left: LeftBehind | None = None):
        self.cfg = cfg
        self.inflight_directory = inflight_directory
        self.host = socket.gethostname()
        self._tasks = None
        self._left = left if left is not None else LeftBehind()

    def prepare(self) -> None:
        """Build the queues and tasks a release uses, then enqueue what a
        previous run left (`release_at_start`) at once, not after the
        sweeper's grace."""
        if self._tasks is None:
            # Imported here: the supervisor imports no task code at module level.
            from daemon.app.tasks import Tasks
            from daemon.store.queue import make_queues

            self._tasks = Tasks(self.cfg, make_queues(self.cfg))
        if self._left:
            left, self._left = self._left, LeftBehind()
            self._enqueue_left_behind(left)

    def _enqueue_left_behind(self, left: LeftBehind) -> None:
        # Counted here, not in release_at_start: the supervisor empties the
        # metrics directory between the two. Imported here: prometheus_client
        # must first see PROMETHEUS_MULTIPROC_DIR, which supervisor.main sets
        # after the CLI has imported this module.
        from daemon import metrics

        metrics.UNCONFIRMED.labels(outcome="recorded").inc(left.unconfirmed)
        try:
            with db_session(close_idle=True):
                for message_id, priority in left.requeued:
                    self._tasks.send_single_message(message_id, priority=priority)
                skip = {m for m, _ in left.requeued}
                resumed = self._tasks.resume_taken(left.taken, skip)
                # What Redis handed to the dying processes' pops.
                replayed = sum(self._tasks.replay_after_death())
        except Exception:  # noqa: BLE001 - the queue may be down
            log.warning("could not enqueue the previous run's rows; the sweeper will")
            return
        log.info(
            "previous run: %d rows and %d taken tasks enqueued again, "
            "%d more replayed from drained queues",
            len(left.requeued),
            resumed,
            replayed,
        )

    def release(self, pid: int) -> tuple[int, int, int, int]:
        """(pid, rows queued again, rows unconfirmed, tasks the queues lost)."""
        in_flight = None  # the directory was removed under us: all may have left
        if inflight_records_kept(self.inflight_directory):
            in_flight = read_inflight(self.inflight_directory, pid)
        taken = read_taken(self.inflight_directory, pid)
        replayed = 0
        with db_session(close_idle=True):
            try:
                self.prepare()
                released = self._tasks.release_dead_worker(self.host, pid, in_flight)
                skip = (in_flight or set()) | {m for m, _ in released.requeued}
                replayed = self._tasks.resume_taken(taken, skip)
                replayed += sum(self._tasks.replay_after_death())
            except Exception:  # noqa: BLE001 - the queue may be down
                # The rows are still released; the sweeper enqueues them.
                log.warning("could not enqueue worker %s's rows; the sweeper will", pid)
                released = unconfirmed.release_dead_process(self.host, pid, in_flight)
        clear_inflight(self.inflight_directory, pid)
        return pid, len(released.requeued), released.unconfirmed, replayed
