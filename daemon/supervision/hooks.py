"""What the supervisor does to the application's rows, handed in as callables.

The supervisor holds no business logic and imports none (like gunicorn's
server hooks): the CLI wires these from `daemon.app.recovery`. Without them
(the default) a dead worker's leases are left to expire and the sweeper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class LeaseReleaser(Protocol):
    def release(self, pid: int) -> tuple[int, int, int]:
        """Release dead worker `pid`'s leases: (pid, rows queued, unconfirmed)."""


@dataclass(frozen=True)
class SupervisorHooks:
    # Called once at start, the schema migrated and the database open:
    # release the leases of this host's dead processes (a previous run).
    on_start: Callable[[object], None] | None = None
    # Called with (cfg, in-flight records directory); its `release(pid)` runs
    # on the supervisor's database thread when a worker dies.
    lease_releaser: Callable[[object, str], LeaseReleaser] | None = None
