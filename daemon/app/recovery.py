"""Leases of dead processes: what the supervisor calls, wired by the CLI.

A worker killed mid-send leaves rows leased to it. Those it had on the wire
(its in-flight records) become unconfirmed; the others never left and are
queued again at once. The supervisor runs these through
`daemon.supervision.hooks.SupervisorHooks` and imports none of it.
"""

from __future__ import annotations

import logging
import socket

from daemon.domain import unconfirmed
from daemon.runtime import clear_inflight
from daemon.runtime import inflight_dir
from daemon.runtime import read_inflight
from daemon.runtime import read_taken
from daemon.store.db import db_session
from daemon.store.db import is_postgres
from daemon.store.models import database

# Logged from the supervisor process, under its name.
log = logging.getLogger("daemon.supervision.supervisor")


def release_at_start(cfg) -> None:
    """Release the leases this host's dead processes (a previous run) left.

    Workers SIGKILLed with the daemon left leases that would otherwise hold
    their rows until the lease expires; their in-flight records tell which
    requests may have left.
    """
    import psutil

    directory = inflight_dir(cfg.data_path)
    seen: list[int] = []

    def in_flight_of(pid: int) -> set[int]:
        seen.append(pid)
        return read_inflight(directory, pid)

    for warning in durability_warnings():
        log.warning("%s", warning)
    released = unconfirmed.release_dead_processes(
        socket.gethostname(), psutil.pid_exists, in_flight_of
    )
    for pid in seen:
        clear_inflight(directory, pid)
    if released.requeued or released.unconfirmed:
        log.info(
            "dead processes' leases: %d rows queued again, %d unconfirmed",
            len(released.requeued),
            released.unconfirmed,
        )


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

    def __init__(self, cfg, inflight_directory: str):
        self.cfg = cfg
        self.inflight_directory = inflight_directory
        self.host = socket.gethostname()
        self._tasks = None

    def prepare(self) -> None:
        """Build the queues and tasks a release uses."""
        if self._tasks is None:
            # Imported here: the supervisor imports no task code at module level.
            from daemon.app.tasks import Tasks
            from daemon.store.queue import make_queues

            self._tasks = Tasks(self.cfg, make_queues(self.cfg))

    def release(self, pid: int) -> tuple[int, int, int, int]:
        """(pid, rows queued again, rows unconfirmed, tasks the queues lost)."""
        in_flight = read_inflight(self.inflight_directory, pid)
        taken = read_taken(self.inflight_directory, pid)
        replayed = 0
        with db_session(close_idle=True):
            try:
                self.prepare()
                released = self._tasks.release_dead_worker(self.host, pid, in_flight)
                skip = in_flight | {m for m, _ in released.requeued}
                replayed = self._tasks.resume_taken(taken, skip)
                replayed += sum(self._tasks.replay_after_death())
            except Exception:  # noqa: BLE001 - the queue may be down
                # The rows are still released; the sweeper enqueues them.
                log.warning("could not enqueue worker %s's rows; the sweeper will", pid)
                released = unconfirmed.release_dead_process(self.host, pid, in_flight)
        clear_inflight(self.inflight_directory, pid)
        return pid, len(released.requeued), released.unconfirmed, replayed
