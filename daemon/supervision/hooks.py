"""What the supervisor does to the application's rows, handed in as callables.

The supervisor holds no business logic and imports none (like gunicorn's
server hooks): the CLI wires these from `daemon.app.recovery`. Without them
(the default) a dead worker's leases are left to expire and the sweeper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Logged from the supervisor process, under its name.
log = logging.getLogger("daemon.supervision.supervisor")


class LeaseReleaser(Protocol):
    def prepare(self) -> None:
        """Load what `release` needs, off the loop, before any death."""

    def release(self, pid: int) -> tuple[int, int, int, int]:
        """Release dead worker `pid`'s leases: (pid, rows queued, unconfirmed,
        tasks its queues lost, enqueued again)."""


@dataclass(frozen=True)
class SupervisorHooks:
    # Called once at start, the schema migrated and the database open:
    # release the leases of this host's dead processes (a previous run).
    on_start: Callable[[object], None] | None = None
    # Called with (cfg, in-flight records directory); its `release(pid)` runs
    # on the supervisor's database thread when a worker dies.
    lease_releaser: Callable[[object, str], LeaseReleaser] | None = None


def lease_releaser(
    hooks: SupervisorHooks, cfg, inflight_directory: str
) -> LeaseReleaser | None:
    """The supervisor's releaser of dead workers' leases, if the CLI wired one."""
    if hooks.lease_releaser is None:
        return None
    return hooks.lease_releaser(cfg, inflight_directory)


def log_released(result: tuple[int, int, int, int] | None) -> None:
    """After `LeaseReleaser.release` (on the loop): say what it did, if anything."""
    if result and any(result[1:]):
        log.info(
            "worker %s died: %d rows queued again, %d unconfirmed, "
            "%d lost tasks enqueued again",
            *result,
        )
