"""The warm spare: an idle child with every role's code imported.

`Spare` is the supervisor's side; `standby` is the spare process's body.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import time

from daemon.runtime import HEARTBEAT_ENV
from daemon.runtime import die_with_parent
from daemon.runtime import role_tag
from daemon.runtime import set_process_name
from daemon.runtime import setup_logging
from daemon.runtime import show_role_in_cmdline
from daemon.runtime import skip_unused_drivers
from daemon.supervision.child import ChildPolicy
from daemon.supervision.child import OsProcesses
from daemon.supervision.child import describe_exit

log = logging.getLogger("daemon.supervision.supervisor")

STANDBY_READY = b"ready\n"
_STANDBY_FD = 0


class SpareState(enum.Enum):
    NONE = "none"  # no spare process (not started yet, taken, or dead)
    STARTING = "starting"  # spawned, still importing
    READY = "ready"  # imported everything, waiting for a role


class Spare:
    """The warm spare: one idle process with every role's code imported.

    It is exec'ed like a child (``child --standby``, own process group) with
    one end of a socketpair as its stdin; it writes ``ready`` there once its
    imports are done and then waits for one JSON line naming its role. A
    STARTING spare can be given a role too: the line waits in the socket and
    the spare, already part-way through its imports, still beats an exec.
    A spare that dies is replaced after the children's backoff delays; with
    no spare, `take` returns None and the child is exec'ed as before.
    """

    def __init__(
        self, ops: OsProcesses, selector: selectors.BaseSelector, policy: ChildPolicy
    ):
        self.ops = ops
        self.policy = policy  # its backoff delays apply to spares too
        self.selector = selector
        self.state = SpareState.NONE
        self.state_since = 0.0
        self.pid: int | None = None
        self.channel: socket.socket | None = None
        self.retired: set[int] = set()  # killed, not reaped yet
        self.failures = 0  # deaths in a row before reaching READY
        self.retry_at = 0.0
        self.taken = 0  # roles handed over
        self.last_exit = ""

    @property
    def alive(self) -> bool:
        return self.pid is not None or bool(self.retired)

    def owns(self, pid: int) -> bool:
        return pid == self.pid or pid in self.retired

    def change_state(
        self, new: SpareState, reason: str, now: float, level: int = logging.INFO
    ) -> None:
        old, self.state, self.state_since = self.state, new, now
        log.log(level, "spare: %s -> %s (%s)", old.name, new.name, reason)

    def due(self, now: float) -> bool:
        return self.state is SpareState.NONE and now >= self.retry_at

    def next_deadline(self, now: float) -> float | None:
        if self.state is SpareState.NONE and self.retry_at > now:
            return self.retry_at
        return None

    def start(self, now: float, argv: tuple[str, ...]) -> None:
        """Exec a new spare; NONE -> STARTING."""
        ours, theirs = socket.socketpair()
        try:
            pid = self.ops.spawn(argv, {}, stdin=theirs.fileno())
        except OSError as exc:
            ours.close()
            self._failed(now, f"spawn failed: {exc}")
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channel = ours
        self.selector.register(ours, selectors.EVENT_READ, self._on_channel)
        self.pid = pid
        self.change_state(SpareState.STARTING, f"pid {pid}", now)

    def _on_channel(self, _mask: int) -> None:
        try:
            data = self.channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the spare died: the reaper records it
            self.close_channel()
        elif self.state is SpareState.STARTING:
            self.failures = 0
            self.change_state(
                SpareState.READY,
                f"pid {self.pid} imported every role",
                time.monotonic(),
            )

    def take(self, role: str, heartbeat_path, now: float) -> int | None:
        """Hand `role` to the spare; its pid, or None when there is no spare."""
        if self.pid is None or self.channel is None:
            return None
        line = json.dumps({"role": role, "heartbeat": str(heartbeat_path)}) + "\n"
        try:
            self.channel.send(line.encode())
        except OSError as exc:  # died an instant ago, not reaped yet
            self.retire(now, f"cannot hand over {role}: {exc}")
            return None
        pid, self.pid = self.pid, None
        self.close_channel()
        self.taken += 1
        self.change_state(SpareState.NONE, f"pid {pid} became {role}", now)
        return pid

    def retire(self, now: float, reason: str) -> None:
        """Kill the spare (it holds nothing; there is nothing to drain)."""
        self.close_channel()
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        self.retired.add(pid)
        self.ops.signal(pid, signal.SIGKILL, group=True)
        self.change_state(SpareState.NONE, f"{reason}: SIGKILL pid {pid}", now)

    def finish(self, pid: int, status: int, now: float) -> None:
        """Record a reaped spare; one that died on its own is replaced later."""
        if pid in self.retired:
            self.retired.discard(pid)
            log.info("spare: pid %s %s", pid, describe_exit(status, True)[0])
            return
        self.pid = None
        self.close_channel()
        self._failed(now, f"pid {pid} {describe_exit(status)[0]}")

    def _failed(self, now: float, words: str) -> None:
        self.failures += 1
        self.last_exit = words
        self.retry_at = now + self.policy.backoff_delay(self.failures)
        self.change_state(
            SpareState.NONE,
            f"{words}; next spare in {self.retry_at - now:.2f}s",
            now,
            logging.WARNING,
        )

    def close_channel(self) -> None:
        if self.channel is None:
            return
        try:
            self.selector.unregister(self.channel)
        except (KeyError, ValueError):
            pass
        self.channel.close()
        self.channel = None

    def status(self, now: float) -> dict:
        """The spare as the status socket shows it (not a role)."""
        return {
            "state": self.state.value,
            "pid": self.pid,
            "state_for_s": round(now - self.state_since, 2),
            "roles_taken": self.taken,
            "last_exit": self.last_exit or None,
        }


def standby(cfg, run_role, imports: tuple[str, ...]) -> int:
    """The warm spare's body: import every role, then become the role we are sent.

    `run_role(cfg, role)` and the modules to import come from the CLI, which
    knows the roles (this layer does not import them).

    The supervisor writes one JSON line ``{"role": ..., "heartbeat": ...}`` to
    our stdin; EOF means we are not needed. Nothing is opened before that
    line (no database, queue or socket), so the role starts exactly as a
    freshly exec'ed child would, minus the imports.
    """
    die_with_parent()
    setup_logging(cfg.daemon.log_level, "spare")
    set_process_name("cd-spare")
    skip_unused_drivers(cfg)
    for module in imports:
        importlib.import_module(module)
    if cfg.database_url.startswith(("postgresql:", "postgres:")):
        importlib.import_module("playhouse.postgres_ext")
    try:
        os.write(_STANDBY_FD, STANDBY_READY)
    except OSError:  # the supervisor closed its end: a role may be waiting
        pass
    order = _read_line(_STANDBY_FD)
    # The role must not keep the supervisor's socket as its stdin.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, _STANDBY_FD)
    os.close(null)
    if not order:
        return 0
    message = json.loads(order)
    role = message["role"]
    os.environ[HEARTBEAT_ENV] = message["heartbeat"]
    set_process_name(role_tag(role))
    show_role_in_cmdline(role)
    return run_role(cfg, role)


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        data += chunk
    return data
