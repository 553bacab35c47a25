"""The states of one supervised child, and the groups the supervisor asks about.

Stdlib only, so any module (status client included) can import it without
pulling in the supervisor.

    STOPPED ──spawn──> STARTING ──first heartbeat──> RUNNING
       ^                  │  │                          │
       │                  │  └──────stop──────┐         │ stop (recycle, stale,
       │   requested exit │                   v         │  restart, hard limit)
       └──────────────────┼──────────────── STOPPING <──┘
                          │ unexpected exit    │ exit after a health stop
                          v                    v
                        EXITED ──> STARTING (first restart at once)
                          ├──────> BACKOFF ──delay──> STARTING
                          └──────> FATAL ──cool-down──> STARTING
"""

from __future__ import annotations

import enum


class ChildState(enum.Enum):
    STOPPED = "STOPPED"  # not running, and not meant to be (yet / any more)
    STARTING = "STARTING"  # spawned, no heartbeat seen yet
    RUNNING = "RUNNING"  # heartbeat seen: the role is up
    BACKOFF = "BACKOFF"  # exited, waiting for its restart delay
    # Asked to stop (SIGTERM sent: a worker drains), SIGKILL at a deadline, or
    # sooner if a task outlives the hard limit plus the stop timeout.
    STOPPING = "STOPPING"
    EXITED = "EXITED"  # exited on its own; the respawn policy decides next
    FATAL = "FATAL"  # crash loop: left alone until the cool-down passes


# A live process exists (not reaped yet): it can be signalled.
ALIVE_STATES = frozenset({ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING})
# No process: nothing to signal, nothing to reap.
DEAD_STATES = frozenset(set(ChildState) - ALIVE_STATES)
# Down for alerting purposes: anything but RUNNING.
DOWN_STATES = frozenset(set(ChildState) - {ChildState.RUNNING})
# Waiting on the respawn policy (a restart will come by itself).
WAITING_STATES = frozenset({ChildState.EXITED, ChildState.BACKOFF, ChildState.FATAL})

# Every legal move, by destination: change_state() asserts the source is here.
LEGAL_SOURCES = {
    ChildState.STARTING: frozenset(
        {ChildState.STOPPED, ChildState.EXITED, ChildState.BACKOFF, ChildState.FATAL}
    ),
    ChildState.RUNNING: frozenset({ChildState.STARTING}),
    ChildState.STOPPING: frozenset({ChildState.STARTING, ChildState.RUNNING}),
    ChildState.STOPPED: frozenset(
        {ChildState.STOPPING, ChildState.EXITED, ChildState.BACKOFF, ChildState.FATAL}
    ),
    ChildState.EXITED: frozenset(
        {ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING}
    ),
    ChildState.BACKOFF: frozenset({ChildState.EXITED}),
    ChildState.FATAL: frozenset({ChildState.EXITED}),
}
