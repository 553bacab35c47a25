"""The zygote: one exec'd process that imports every role once and forks them.

`Zygote` is the supervisor's side; `serve` is the zygote process's body.

Every role used to be its own exec'd interpreter importing the same libraries
(20-40 MB and half a second of CPU each). The zygote imports them once,
freezes what it imported out of the garbage collector's reach (`gc.freeze`,
so collections in the children do not write to, and copy, the shared pages),
and forks a role whenever the supervisor asks: the roles share its pages
copy-on-write and start without importing anything.

Each role is forked twice (zygote -> intermediate -> role) and the
intermediate exits at once, so the role is re-parented to the supervisor,
which is a child subreaper (PR_SET_CHILD_SUBREAPER): the supervisor reaps it
with waitpid like any exec'd child, reads its exit status, and the role's
parent-death signal is tied to the supervisor, not to the zygote. A role in
its own process group, with /dev/null as stdin, is indistinguishable from an
exec'd one except for its memory.

The zygote holds nothing (no thread, socket, database connection or file
other than its channel), so a fork is safe. When it is not READY (starting,
dead, broken) the supervisor exec's roles as before: the zygote makes the
tree lighter and faster to start, never a condition for running.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import gc
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from daemon.runtime import HEARTBEAT_ENV
from daemon.runtime import SUPERVISOR_PID_ENV
from daemon.runtime import cmdline_room
from daemon.runtime import die_with_parent
from daemon.runtime import role_tag
from daemon.runtime import set_process_name
from daemon.runtime import setup_logging
from daemon.runtime import show_in_cmdline
from daemon.runtime import show_role_in_cmdline
from daemon.runtime import skip_unused_drivers
from daemon.supervision.child import ChildPolicy
from daemon.supervision.child import OsProcesses
from daemon.supervision.child import describe_exit

log = logging.getLogger("daemon.supervision.supervisor")

ZYGOTE_READY = b"ready\n"
_CHANNEL_FD = 0
_PR_SET_CHILD_SUBREAPER = 36
# A fork answers in a few ms; past this the zygote is taken for hung.
FORK_ANSWER_S = 5.0
# At start-up roles wait this long for the zygote's imports before being
# exec'd: an exec would import the same modules, on the same CPUs.
START_WAIT_S = 10.0
# How long a forked role waits to be re-parented to the supervisor.
_REPARENT_WAIT_S = 2.0


class ZygoteState(enum.Enum):
    NONE = "none"  # no zygote process (not started yet, or dead)
    STARTING = "starting"  # exec'd, still importing
    READY = "ready"  # imported everything, forks roles on request


def become_subreaper() -> bool:
    """Make orphaned descendants (the forked roles) our children; False if not Linux."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Zygote:
    """The supervisor's handle on the zygote process.

    It is exec'd like a child (``child --zygote``, own process group) with one
    end of a socketpair as its stdin; it writes ``ready`` there once its
    imports are done. Then each `fork_role` is one JSON line out and one back
    (``{"pid": N}``), answered in a few ms. A zygote that dies is re-exec'd
    after the children's backoff delays; meanwhile `fork_role` returns None
    and the child is exec'd.
    """

    def __init__(
        self, ops: OsProcesses, selector: selectors.BaseSelector, policy: ChildPolicy
    ):
        self.ops = ops
        self.policy = policy  # its backoff delays and start timeout apply too
        self.selector = selector
        self.state = ZygoteState.NONE
        self.state_since = 0.0
        self.pid: int | None = None
        self.channel: socket.socket | None = None
        self.retired: set[int] = set()  # killed, not reaped yet
        self.failures = 0  # deaths in a row before reaching READY
        self.retry_at = 0.0
        self.started_at: float | None = None  # of the first zygote
        self.forks = 0  # roles forked
        self.last_exit = ""
        self.how = ""  # "exec'd", or "forked by the supervisor" (prefork)

    @property
    def alive(self) -> bool:
        return self.pid is not None or bool(self.retired)

    def owns(self, pid: int) -> bool:
        return pid == self.pid or pid in self.retired

    def change_state(
        self, new: ZygoteState, reason: str, now: float, level: int = logging.INFO
    ) -> None:
        old, self.state, self.state_since = self.state, new, now
        log.log(level, "zygote: %s -> %s (%s)", old.name, new.name, reason)

    def due(self, now: float) -> bool:
        return self.state is ZygoteState.NONE and now >= self.retry_at

    def holds_first_start(self, now: float) -> bool:
        """True while the first zygote imports: the first spawns wait for it."""
        return (
            self.state is ZygoteState.STARTING
            and self.forks == 0
            and self.started_at is not None
            and now - self.started_at < START_WAIT_S
        )

    def next_deadline(self, now: float) -> float | None:
        if self.state is ZygoteState.NONE and self.retry_at > now:
            return self.retry_at
        if self.state is ZygoteState.STARTING:
            # The start timeout, and the end of the first spawns' wait.
            ends = [self.state_since + self.policy.start_timeout_s]
            if self.holds_first_start(now):
                ends.append(self.started_at + START_WAIT_S)
            return min(ends)
        return None

    def check(self, now: float) -> None:
        """A zygote that imports for longer than the start timeout is hung."""
        if (
            self.state is ZygoteState.STARTING
            and now - self.state_since >= self.policy.start_timeout_s
        ):
            self.retire(now, "not ready within supervisor.start_timeout_s")
            self._failed(now, "start timeout")

    def start(self, now: float, argv: tuple[str, ...]) -> None:
        """Exec a new zygote; NONE -> STARTING."""
        ours, theirs = socket.socketpair()
        try:
            pid = self.ops.spawn(argv, {}, stdin=theirs.fileno())
        except OSError as exc:
            ours.close()
            self._failed(now, f"spawn failed: {exc}")
            return
        finally:
            theirs.close()
        self._track(pid, ours, now, "exec'd")

    def adopt(self, first: Preforked, now: float) -> None:
        """Take on the zygote `prefork` made; NONE -> STARTING (it is ready
        as soon as it reads its channel: it has nothing left to import)."""
        self._track(first.pid, first.channel, now, "forked by the supervisor")

    def _track(self, pid: int, channel: socket.socket, now: float, how: str) -> None:
        self.how = how
        channel.setblocking(False)
        self.channel = channel
        self.selector.register(channel, selectors.EVENT_READ, self._on_channel)
        self.pid = pid
        if self.started_at is None:
            self.started_at = now
        self.change_state(ZygoteState.STARTING, f"pid {pid}, {how}", now)

    def _on_channel(self, _mask: int) -> None:
        try:
            data = self.channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the zygote died: the reaper records it
            self.close_channel()
        elif self.state is ZygoteState.STARTING and data == ZYGOTE_READY:
            self.failures = 0
            self.change_state(
                ZygoteState.READY,
                f"pid {self.pid} imported every role",
                time.monotonic(),
            )

    def fork_role(self, role: str, heartbeat_path, now: float) -> int | None:
        """Have the zygote fork `role`: its pid, or None (then exec it)."""
        if self.state is not ZygoteState.READY or self.channel is None:
            return None
        order = json.dumps({"role": role, "heartbeat": str(heartbeat_path)}) + "\n"
        try:
            self.channel.setblocking(True)
            self.channel.settimeout(FORK_ANSWER_S)
            self.channel.sendall(order.encode())
            answer = _recv_line(self.channel)
        except OSError as exc:  # dead, or hung past FORK_ANSWER_S
            self.retire(now, f"cannot fork {role}: {exc}")
            return None
        finally:
            if self.channel is not None:
                self.channel.setblocking(False)
        try:
            pid = int(json.loads(answer)["pid"])
        except (ValueError, KeyError, TypeError):
            words = answer.decode(errors="replace").strip() or "no answer"
            log.warning("zygote: could not fork %s (%s): exec'ing it", role, words)
            return None
        self.forks += 1
        return pid

    def retire(self, now: float, reason: str) -> None:
        """Kill the zygote (it holds nothing; the roles it forked live on)."""
        self.close_channel()
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        self.retired.add(pid)
        self.ops.signal(pid, signal.SIGKILL, group=True)
        self.change_state(ZygoteState.NONE, f"{reason}: SIGKILL pid {pid}", now)

    def finish(self, pid: int, status: int, now: float) -> None:
        """Record a reaped zygote; one that died on its own is re-exec'd later."""
        if pid in self.retired:
            self.retired.discard(pid)
            log.info("zygote: pid %s %s", pid, describe_exit(status, True)[0])
            return
        self.pid = None
        self.close_channel()
        self._failed(now, f"pid {pid} {describe_exit(status)[0]}")

    def _failed(self, now: float, words: str) -> None:
        self.failures += 1
        self.last_exit = words
        self.retry_at = now + self.policy.backoff_delay(self.failures)
        self.change_state(
            ZygoteState.NONE,
            f"{words}; roles are exec'd until the next zygote, "
            f"in {self.retry_at - now:.2f}s",
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
        """The zygote as the status socket shows it (not a role)."""
        return {
            "state": self.state.value,
            "pid": self.pid,
            "state_for_s": round(now - self.state_since, 2),
            "started": self.how or None,
            "roles_forked": self.forks,
            "last_exit": self.last_exit or None,
        }


def stray_roles(known_pids: set[int], role_names: set[str]) -> list[tuple[int, str]]:
    """Our direct children that run a role but that nobody tracks: (pid, role).

    A fork whose answer never reached the supervisor (the zygote hung after
    forking, or died between the fork and its answer) leaves the role running,
    re-parented to the supervisor, while the role is exec'd a second time.
    Every fork and exec the supervisor makes is tracked before its loop runs
    another step, so any child showing ``child ROLE`` that it does not know
    is such a role. Other untracked children (orphans of an alert command)
    are not ours to kill.
    """
    import psutil

    strays = []
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    for child in children:
        if child.pid in known_pids:
            continue
        try:
            words = child.cmdline()
        except psutil.Error:
            continue
        for word, following in zip(words, words[1:], strict=False):
            if word == "child" and following in role_names:
                strays.append((child.pid, following))
                break
    return strays


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------ zygote process


def serve(
    cfg, run_role, imports: tuple[str, ...], channel: socket.socket | None = None
) -> int:
    """The zygote's body: import every role, then fork one per request.

    `run_role(cfg, role)` and the modules to import come from the CLI, which
    knows the roles (this layer does not import them). The channel is stdin
    in an exec'd zygote, or given by `prefork`. EOF on the channel (the
    supervisor closed it or died) ends the zygote. In a forked role this
    function returns the role's `run_role`, so the role leaves through the
    CLI and the interpreter's normal exit (atexit, threads joined), as an
    exec'd role does.
    """
    die_with_parent()
    setup_logging(cfg.daemon.log_level, "zygote")
    set_process_name("cd-zygote")
    skip_unused_drivers(cfg)
    # No collection while importing: it would free objects between the ones
    # that stay, and each role's new objects would fill those holes, copying
    # the shared pages they sit on (the gc.freeze() recipe).
    gc.disable()
    import_roles(cfg, imports)
    if threading.active_count() > 1:
        # Forking a process with threads copies locks they may hold.
        log.error("zygote: an import started a thread: cannot fork safely")
        return 1
    # Objects that exist now are never collected: the children's collections
    # then leave the shared pages alone instead of copying them.
    gc.freeze()
    if channel is None:
        channel = socket.socket(fileno=os.dup(_CHANNEL_FD))
    _stdin_from_devnull()  # no role keeps the channel or a terminal as stdin
    try:
        channel.sendall(ZYGOTE_READY)
        reader = channel.makefile("rb")
        for line in reader:
            order = json.loads(line)
            intermediate = 0
            try:
                role_pid, intermediate = _fork_twice()
            except OSError as exc:  # EAGAIN (a pids limit), ENOMEM
                answer = {"error": str(exc)}
            else:
                if role_pid == 0:
                    break  # we are the role
                answer = {"pid": role_pid}
            channel.sendall(json.dumps(answer).encode() + b"\n")
            if intermediate:
                # Reaped after the answer: its exit (the teardown of a copy
                # of our memory) is not the supervisor's wait.
                os.waitpid(intermediate, 0)
        else:
            return 0
    except (OSError, ValueError) as exc:
        log.info("zygote: channel closed (%s): exiting", exc)
        return 0
    reader.close()
    channel.close()
    return _run_forked_role(cfg, run_role, order)


def import_roles(cfg, imports: tuple[str, ...]) -> None:
    """What the zygote holds: every role's modules and the database driver."""
    for module in imports:
        importlib.import_module(module)
    if cfg.database_url.startswith(("postgresql:", "postgres:")):
        importlib.import_module("playhouse.postgres_ext")


@dataclasses.dataclass(frozen=True)
class RoleCode:
    """What the CLI hands the supervisor so it can fork the first zygote:
    how a forked role runs, and the modules the zygote imports."""

    run_role: Callable
    imports: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Preforked:
    """The first zygote, forked by `prefork`: its pid (0 in the zygote
    itself) and this side's end of the channel."""

    pid: int
    channel: socket.socket


# Room `campaignd run`'s argv must leave for a forked role's command line
# (``python -m daemon child worker:messages#12``): with less, prefork is
# skipped, since `ps` and the stray-role check must see the role.
_ARGV_ROOM = 48


def prefork(
    cfg, imports: tuple[str, ...], env: dict[str, str], close: tuple[int, ...] = ()
) -> Preforked | None:
    """Import every role in this process, then fork the first zygote from it.

    The supervisor then shares the pages of what it imports (psycopg,
    redis-py, peewee, huey: some 30 MB of Python objects) with the zygote
    and every role, instead of holding a private copy of its own: the
    tree's PSS (W5). Only at start, before any thread, socket or database
    connection exists; a later zygote is exec'd (the supervisor has threads
    by then). The zygote's environment becomes `env` (the children's), and
    it closes the fds in `close` (the data directory's lock). None when it
    cannot be forked (a thread runs, an import fails, no argv room): the
    supervisor exec's the zygote as before.
    """
    if threading.active_count() > 1 or cmdline_room() < _ARGV_ROOM:
        return None
    gc.disable()
    try:
        import_roles(cfg, imports)
    except Exception:  # noqa: BLE001 - the exec'd zygote will say what broke
        log.warning("zygote: the roles do not import here: exec'ing it", exc_info=True)
        gc.enable()
        return None
    gc.freeze()
    ours, theirs = socket.socketpair()
    try:
        pid = os.fork()
    except OSError as exc:
        log.warning("zygote: cannot fork it (%s): exec'ing it", exc)
        ours.close()
        theirs.close()
        gc.enable()
        return None
    if pid == 0:
        ours.close()
        for fd in close:
            os.close(fd)
        os.setpgid(0, 0)
        os.environ.clear()
        os.environ.update(env)
        # As an exec'd zygote's argv reads: each role shows itself there.
        sys.orig_argv = [sys.executable, "-m", "daemon", "child", "--zygote"]
        show_in_cmdline(sys.orig_argv)
        return Preforked(0, theirs)
    theirs.close()
    with contextlib.suppress(OSError):  # also from this side, as for roles
        os.setpgid(pid, pid)
    gc.enable()
    return Preforked(pid, ours)


def _stdin_from_devnull() -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, _CHANNEL_FD)
    os.close(null)


def _fork_twice() -> tuple[int, int]:
    """Fork the role through an intermediate that exits at once.

    Returns (0, 0) in the role and (role pid, intermediate pid) in the
    zygote, which reaps the intermediate. The intermediate never returns: it
    must not run a line of the zygote's code.
    """
    pid_r, pid_w = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        os.close(pid_r)
        try:
            role_pid = os.fork()
        except OSError:
            os._exit(1)
        if role_pid == 0:
            os.close(pid_w)
            os.setpgid(0, 0)
            return 0, 0
        try:
            # Also from this side: the supervisor may signal the group as
            # soon as it has the pid, before the role has run a line.
            try:
                os.setpgid(role_pid, role_pid)
            except OSError:
                pass
            os.write(pid_w, str(role_pid).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    try:
        # One short write, read as soon as it is made: reading to EOF would
        # also wait for the intermediate's exit and the role's first run
        # (it holds the pipe until it closes it), 1-3 ms of each respawn.
        role_pid = int(os.read(pid_r, 32) or b"0")
    finally:
        os.close(pid_r)
    if not role_pid:
        os.waitpid(intermediate, 0)
        raise OSError("the intermediate process died before forking the role")
    return role_pid, intermediate


def _run_forked_role(cfg, run_role, order: dict) -> int:
    # The role's parent-death signal and its parent check (die_with_parent,
    # in every role's main) must name the supervisor: set while the
    # intermediate still lives they would name it and fire when it exits,
    # microseconds from now.
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, "0"))
    deadline = time.monotonic() + _REPARENT_WAIT_S
    while supervisor and os.getppid() != supervisor:
        if time.monotonic() > deadline:
            return 1  # the supervisor is gone: so are we
        time.sleep(0.0005)
    os.environ[HEARTBEAT_ENV] = order["heartbeat"]
    role = order["role"]
    gc.enable()
    set_process_name(role_tag(role))
    show_role_in_cmdline(role)
    return run_role(cfg, role)
