"""One supervised role instance: its process, its state machine, its respawn policy.

Every state change goes through `Child.change_state`, which asserts the move is
legal (states.LEGAL_SOURCES) and logs it as ``web: STARTING -> RUNNING (...)``.
Time is a parameter (`now`, from time.monotonic; `wall` for heartbeat mtimes),
so tests drive the whole machine without sleeping. The OS is behind a small
seam (`OsProcesses`: spawn, signal) that unit tests replace.

A spawn first asks the supervisor's zygote to fork the role (`zygote.fork_role`,
a process that has imported every role already); only without a ready zygote
is a new process exec'ed. Either way the child is STARTING with that pid.

Respawn policy (design section 6), worked through for the defaults:
the 1st unexpected exit restarts at once; the 2nd waits 0.1 s, the 3rd 0.2 s,
then 0.4, 0.8 ... up to 60 s. Sixty seconds of RUNNING forget the failures.
The 10th exit inside 300 s makes the role FATAL (an alert fires); 300 s later
it is tried again with a clean slate, so a role is never dead for good.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

from daemon.config import Config
from daemon.runtime import HEARTBEAT_ENV
from daemon.runtime import read_last_words
from daemon.supervision.states import ALIVE_STATES
from daemon.supervision.states import DEAD_STATES
from daemon.supervision.states import LEGAL_SOURCES
from daemon.supervision.states import WAITING_STATES
from daemon.supervision.states import ChildState

log = logging.getLogger(__name__)

# A SIGKILL nobody asked for is most often the kernel's OOM killer.
_SIGNAL_HINTS = {signal.SIGKILL: " (out of memory?)"}


@dataclass(frozen=True)
class RoleSpec:
    """A role instance by name, and the argv that runs it."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ChildPolicy:
    """The numbers one child is judged by, taken from the config once."""

    backoff_initial_s: float
    backoff_max_s: float
    healthy_after_s: float
    crash_loop_exits: int
    crash_loop_window_s: float
    fatal_cooldown_s: float
    start_timeout_s: float
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    # Drain time for graceful stops (recycle, restart, shutdown).
    stop_timeout_s: float
    # Grace for a child already judged unhealthy (stale heartbeat).
    unhealthy_grace_s: float
    hard_time_limit_s: float
    rss_limit_mb: float

    @classmethod
    def from_config(cls, cfg: Config) -> ChildPolicy:
        sup = cfg.supervisor
        return cls(
            backoff_initial_s=sup.backoff_initial_s,
            backoff_max_s=sup.backoff_max_s,
            healthy_after_s=sup.healthy_after_s,
            crash_loop_exits=sup.crash_loop_exits,
            crash_loop_window_s=sup.crash_loop_window_s,
            fatal_cooldown_s=sup.fatal_cooldown_s,
            start_timeout_s=sup.start_timeout_s,
            heartbeat_interval_s=sup.heartbeat_interval_s,
            heartbeat_timeout_s=sup.heartbeat_timeout_s,
            stop_timeout_s=cfg.daemon.stop_timeout_s,
            unhealthy_grace_s=min(5.0, cfg.daemon.stop_timeout_s),
            hard_time_limit_s=cfg.workers.hard_time_limit_s,
            rss_limit_mb=cfg.workers.rss_limit_mb,
        )

    def backoff_delay(self, failures: int) -> float:
        """Delay before restart number `failures` (1 = at once, then doubling)."""
        if failures <= 1:
            return 0.0
        return min(self.backoff_initial_s * 2 ** (failures - 2), self.backoff_max_s)


@dataclass(frozen=True)
class Beat:
    """One heartbeat as read by the supervisor."""

    age_s: float
    oldest_task_started: float  # epoch seconds; 0 when idle
    running_tasks: int


class OsProcesses:
    """The real OS seam: spawn by exec in a new process group, send signals."""

    def __init__(self, base_env: dict[str, str]):
        self.base_env = base_env

    def spawn(
        self, argv: tuple[str, ...], env: dict[str, str], stdin: int | None = None
    ) -> int:
        """Exec argv in its own process group; `stdin`: an fd to give as fd 0."""
        # posix_spawn (vfork + exec): no Python runs between fork and exec,
        # nothing leaks. Own process group: a terminal's Ctrl-C reaches only
        # the supervisor, which runs the stop protocol, and SIGKILL can take
        # a child's whole group. SIGPIPE/SIGXFSZ are ignored by Python and
        # would stay ignored across exec without setsigdef.
        actions = [] if stdin is None else [(os.POSIX_SPAWN_DUP2, stdin, 0)]
        return os.posix_spawnp(
            argv[0],
            list(argv),
            {**self.base_env, **env},
            setpgroup=0,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            setsigmask=(),
            file_actions=actions,
        )

    def signal(self, pid: int, sig: int, group: bool = False) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:  # exited already; the reaper will see it
            pass


def describe_exit(status: int, requested: bool = False) -> tuple[str, int | None, int]:
    """A waitpid status in words, its exit code, and the log level it deserves.

    `requested`: we sent the fatal signal ourselves (no OOM hint, no error).
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if requested or sig == signal.SIGTERM:
            return f"killed by {name}", None, logging.WARNING
        return f"killed by {name}{_SIGNAL_HINTS.get(sig, '')}", None, logging.ERROR
    code = os.waitstatus_to_exitcode(status)
    return f"exited {code}", code, logging.INFO if code == 0 else logging.WARNING


def read_beat(path: Path, wall: float) -> Beat | None:
    """The child's last heartbeat, or None before its first one.

    Format (runtime.Heartbeat): ``<oldest_task_started_epoch> <running>``; an
    empty file is a heartbeat object created but not beaten yet.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(100).split()
    except FileNotFoundError:
        return None
    if st.st_size == 0:
        return None
    try:
        oldest, running = float(data[0]), int(data[1])
    except (IndexError, ValueError):
        oldest, running = 0.0, 0
    return Beat(max(0.0, wall - st.st_mtime), oldest, running)


class Child:
    """One role instance and everything the supervisor knows about it."""

    def __init__(
        self, spec: RoleSpec, policy: ChildPolicy, heartbeat_path, ops, zygote=None
    ):
        self.spec = spec
        self.policy = policy
        self.heartbeat_path = Path(heartbeat_path)
        self.ops = ops
        # fork_role(role, heartbeat_path, now) -> pid forked by the zygote, or None.
        self.zygote = zygote
        self.state = ChildState.STOPPED
        self.state_since = 0.0
        self.pid: int | None = None
        self.spawned_at: float | None = None  # monotonic
        self.running_since: float | None = None
        self.down_since: float | None = None  # None while RUNNING
        # Unplanned exits (crash, kill, health kill, hard limit), each followed
        # by a respawn; a reload, a `restart` or RSS recycling is not one.
        self.restarts = 0
        self.last_exit = ""  # "exited 1", "killed by SIGKILL"...
        self.last_exit_code: int | None = None  # of the last unexpected exit
        self.failures = 0  # consecutive quick failures: drives the backoff
        self.exits: collections.deque[float] = collections.deque()
        # Unexpected exits of the last hour, for the restart-rate alert.
        self.unplanned_exits: collections.deque[float] = collections.deque()
        self.retry_at: float | None = None  # BACKOFF / FATAL: next try
        self.kill_at: float | None = None  # STOPPING: SIGKILL deadline
        self.killed = False  # SIGKILL sent to this process
        self.stop_reason = ""
        self.restart_after_stop = True  # STOPPED: spawn again?
        self.stop_is_failure = False  # a health kill counts as a crash
        self.beat: Beat | None = None
        self.rss_mb: float | None = None
        self.cpu_percent: float | None = None
        self._proc: psutil.Process | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def successor(self, reason: str) -> Child:
        """This role's Child for its next process, to start while this one's
        keeps draining (see Reloading._replace_next): same heartbeat file (the
        draining process beats no more), the history that counts restarts and
        crash loops carried over, STOPPED and due to spawn."""
        child = Child(
            self.spec, self.policy, self.heartbeat_path, self.ops, zygote=self.zygote
        )
        for name in (
            "restarts",
            "last_exit",
            "last_exit_code",
            "failures",
            "exits",
            "unplanned_exits",
            "down_since",
        ):
            setattr(child, name, getattr(self, name))
        child.stop_reason = reason
        return child

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    def __repr__(self) -> str:
        return f"<Child {self.name} {self.state.name} pid={self.pid}>"

    # ------------------------------------------------------------ transitions

    def change_state(self, new: ChildState, reason: str, now: float) -> None:
        """The only place a state changes: check the move, stamp it, log it."""
        old = self.state
        if old not in LEGAL_SOURCES[new]:
            raise AssertionError(
                f"{self.name}: illegal move {old.name} -> {new.name} ({reason})"
            )
        self.state = new
        self.state_since = now
        if new is ChildState.RUNNING:
            self.running_since = now
            self.down_since = None
        elif old is ChildState.RUNNING or self.down_since is None:
            self.running_since = None
            self.down_since = now
        if new is ChildState.FATAL:
            level = logging.ERROR
        elif new in (ChildState.EXITED, ChildState.BACKOFF):
            level = logging.WARNING
        else:
            level = logging.INFO
        log.log(level, "%s: %s -> %s (%s)", self.name, old.name, new.name, reason)

    def transition(self, now: float, respawn: bool = True) -> None:
        """Move on by time: kill past deadlines, restart when the policy allows."""
        state = self.state
        if state is ChildState.STOPPING:
            # STOPPING -> (SIGKILL): the grace is over
            if not self.killed and self.kill_at is not None and now >= self.kill_at:
                self._sigkill(f"still alive {self.policy_grace_text(now)}")
        elif state is ChildState.RUNNING:
            # RUNNING: up long enough to forget past failures
            up_for = now - self.running_since
            if self.failures and up_for >= self.policy.healthy_after_s:
                log.info("%s: healthy again, backoff reset", self.name)
                self.failures = 0
        elif not respawn:
            # EXITED / BACKOFF / FATAL -> STOPPED: the daemon is stopping
            if state in WAITING_STATES:
                self.change_state(ChildState.STOPPED, "daemon stopping", now)
        elif state is ChildState.EXITED:
            self._after_exit(now)
        elif state is ChildState.BACKOFF and now >= self.retry_at:
            # BACKOFF -> STARTING: the delay is over
            self.spawn(now, f"retry after backoff (failure {self.failures})")
        elif state is ChildState.FATAL and now >= self.retry_at:
            # FATAL -> STARTING: cool-down over, try again with a clean slate
            self.exits.clear()
            self.failures = 0
            self.spawn(now, "cool-down over, trying again")
        elif state is ChildState.STOPPED and self.restart_after_stop:
            # STOPPED -> STARTING: first start, or the second half of a recycle
            self.spawn(now, self.stop_reason or "start")

    def policy_grace_text(self, now: float) -> str:
        return f"{now - self.state_since:.1f}s after SIGTERM"

    def _after_exit(self, now: float) -> None:
        if len(self.exits) >= self.policy.crash_loop_exits:
            # EXITED -> FATAL: crash loop
            self.retry_at = now + self.policy.fatal_cooldown_s
            self.change_state(
                ChildState.FATAL,
                f"crash loop: {len(self.exits)} exits in "
                f"{self.policy.crash_loop_window_s:g}s, next try in "
                f"{self.policy.fatal_cooldown_s:g}s",
                now,
            )
            return
        self.failures += 1
        delay = self.policy.backoff_delay(self.failures)
        if delay <= 0:
            # EXITED -> STARTING: the first restart is immediate
            self.spawn(now, "restart at once")
            return
        # EXITED -> BACKOFF
        self.retry_at = now + delay
        self.change_state(
            ChildState.BACKOFF,
            f"restart in {delay:.2f}s (failure {self.failures})",
            now,
        )

    def next_deadline(self, now: float) -> float | None:
        """When transition() has something to do next (monotonic), if ever."""
        state = self.state
        if state is ChildState.STOPPING and not self.killed:
            return self.kill_at
        if state is ChildState.RUNNING and self.failures:
            return self.running_since + self.policy.healthy_after_s
        if state in (ChildState.BACKOFF, ChildState.FATAL):
            return self.retry_at
        if state is ChildState.EXITED or (
            state is ChildState.STOPPED and self.restart_after_stop
        ):
            return now
        return None

    # ---------------------------------------------------------------- actions

    def spawn(self, now: float, reason: str) -> None:
        """Start the process (fork or exec); STARTING until its first heartbeat."""
        # A heartbeat left by the previous process must not count as this
        # one's first beat.
        self.heartbeat_path.unlink(missing_ok=True)
        self.beat = None
        self.killed = False
        self.kill_at = None
        self.stop_reason = ""
        self.stop_is_failure = False
        self.restart_after_stop = True
        self.retry_at = None
        self.rss_mb = self.cpu_percent = None
        self._proc = None
        pid = None
        if self.zygote is not None:
            pid = self.zygote.fork_role(self.name, self.heartbeat_path, now)
        how = f"pid {pid}, forked by the zygote"
        if pid is None:
            try:
                pid = self.ops.spawn(
                    self.spec.argv, {HEARTBEAT_ENV: str(self.heartbeat_path)}
                )
            except OSError as exc:
                self.change_state(ChildState.STARTING, reason, now)
                self.spawned_at = now
                self.last_exit = f"spawn failed: {exc}"
                self.last_exit_code = None
                self.change_state(ChildState.EXITED, self.last_exit, now)
                self._count_exit(now)
                return
            how = f"pid {pid}"
        self.pid = pid
        self.spawned_at = now
        self.change_state(ChildState.STARTING, f"{reason}; {how}", now)

    def stop(
        self,
        now: float,
        reason: str,
        grace_s: float,
        *,
        restart: bool = True,
        failure: bool = False,
    ) -> None:
        """Ask the process to stop (SIGTERM); SIGKILL follows after `grace_s`."""
        if self.state in DEAD_STATES:
            if not restart and self.state is not ChildState.STOPPED:
                self.change_state(ChildState.STOPPED, reason, now)
            self.restart_after_stop = restart
            return
        deadline = now + grace_s
        self.restart_after_stop = restart
        self.stop_is_failure = self.stop_is_failure or failure
        if self.state is ChildState.STOPPING:
            self.kill_at = min(self.kill_at or deadline, deadline)
            return
        self.kill_at = deadline
        self.stop_reason = reason
        self.ops.signal(self.pid, signal.SIGTERM)
        self.change_state(ChildState.STOPPING, f"{reason}; SIGTERM sent", now)

    def kill(
        self, now: float, reason: str, *, restart: bool = True, failure: bool = False
    ) -> None:
        """SIGKILL the child's process group now (no grace)."""
        if self.state in DEAD_STATES:
            return
        self.restart_after_stop = restart and self.restart_after_stop
        self.stop_is_failure = self.stop_is_failure or failure
        if self.state is not ChildState.STOPPING:
            self.stop_reason = reason
            self.kill_at = now
            self.change_state(ChildState.STOPPING, reason, now)
        self._sigkill(reason)

    def _sigkill(self, reason: str) -> None:
        log.warning("%s: SIGKILL pid %s (%s)", self.name, self.pid, reason)
        self.killed = True
        # The group too: whatever the child started must not outlive it.
        self.ops.signal(self.pid, signal.SIGKILL, group=True)
        self.ops.signal(self.pid, signal.SIGKILL)

    def finish(self, status: int, now: float) -> str:
        """Record an exit reaped by the supervisor; return it in words."""
        words, code, level = describe_exit(status, requested=self.killed)
        # A child that exits on purpose may have said why (a taken port).
        said = read_last_words(str(self.heartbeat_path), self.pid)
        if said:
            words = f"{words}: {said}"
        uptime = 0.0 if self.spawned_at is None else now - self.spawned_at
        log.log(level, "%s: pid %s %s after %.1fs", self.name, self.pid, words, uptime)
        self.pid = None
        self._proc = None
        self.last_exit = words
        self.rss_mb = self.cpu_percent = None
        if self.state is ChildState.STOPPING and not self.stop_is_failure:
            # STOPPING -> STOPPED: the exit we asked for
            self.change_state(ChildState.STOPPED, words, now)
            return words
        # STARTING / RUNNING / STOPPING(health kill) -> EXITED
        self.last_exit_code = code
        self.change_state(ChildState.EXITED, f"{words} after {uptime:.1f}s", now)
        self._count_exit(now)
        return words

    def _count_exit(self, now: float) -> None:
        uptime = 0.0 if self.spawned_at is None else now - self.spawned_at
        if uptime >= self.policy.healthy_after_s:
            self.failures = 0
        self.exits.append(now)
        while self.exits and self.exits[0] < now - self.policy.crash_loop_window_s:
            self.exits.popleft()
        self.restarts += 1
        self.unplanned_exits.append(now)
        while self.unplanned_exits and self.unplanned_exits[0] < now - 3600.0:
            self.unplanned_exits.popleft()

    # ----------------------------------------------------------------- health

    def check_heartbeat(self, now: float, wall: float) -> None:
        """Promote on the first beat; stop a stale child; drain a stuck task."""
        if self.state is ChildState.STOPPING and not self.killed:
            self._check_stopping_task(wall)
            return
        if self.state not in (ChildState.STARTING, ChildState.RUNNING):
            return
        beat = self.beat = read_beat(self.heartbeat_path, wall)
        policy = self.policy
        if self.state is ChildState.STARTING:
            if beat is not None:
                # STARTING -> RUNNING
                self.change_state(
                    ChildState.RUNNING,
                    f"first heartbeat after {now - self.spawned_at:.2f}s",
                    now,
                )
            elif now - self.spawned_at > policy.start_timeout_s:
                self.stop(
                    now,
                    f"no heartbeat {policy.start_timeout_s:g}s after start",
                    policy.unhealthy_grace_s,
                    failure=True,
                )
            return
        if beat is None or beat.age_s > policy.heartbeat_timeout_s:
            age = "gone" if beat is None else f"{beat.age_s:.1f}s old"
            self.stop(now, f"heartbeat {age}", policy.unhealthy_grace_s, failure=True)
            return
        task_age = wall - beat.oldest_task_started
        if beat.oldest_task_started and task_age > policy.hard_time_limit_s:
            # Thread workers cannot be interrupted, and a SIGKILL now would
            # cut off the other threads' healthy sends too. So the worker
            # drains: SIGTERM, it claims nothing more, the other threads
            # finish and record, and it exits; SIGKILL only at the stop
            # timeout. The stuck send's in-flight record makes its row
            # unconfirmed when the process is reaped (LeaseReleaser).
            self.stop(
                now,
                f"task running for {task_age:.1f}s, past the hard limit of "
                f"{policy.hard_time_limit_s:g}s: draining",
                policy.stop_timeout_s,
                failure=True,
            )

    def _check_stopping_task(self, wall: float) -> None:
        """A draining child still obeys the hard limit: no task may outlive
        the hard limit plus one stop timeout (what a message lease covers),
        whatever grace the stop was given. Plus one heartbeat interval: a
        task is seen at the first beat after it started, so the drain may
        begin up to that late, and must still get its whole stop timeout."""
        beat = read_beat(self.heartbeat_path, wall)
        if beat is None or not beat.oldest_task_started:
            return
        task_age = wall - beat.oldest_task_started
        policy = self.policy
        limit = (
            policy.hard_time_limit_s
            + policy.stop_timeout_s
            + policy.heartbeat_interval_s
        )
        if task_age > limit:
            self._sigkill(
                f"task running for {task_age:.1f}s while stopping, past the hard "
                f"limit plus the stop timeout ({limit:g}s)"
            )

    def inspect(self, now: float) -> str | None:
        """Sample RSS and CPU (psutil); recycle over the RSS limit. Returns status."""
        if self.pid is None or self.state not in ALIVE_STATES:
            return None
        try:
            if self._proc is None:
                self._proc = psutil.Process(self.pid)
            with self._proc.oneshot():
                status = self._proc.status()
                rss = self._proc.memory_info().rss
                # Non-blocking: CPU time since the previous call (0.0 first).
                self.cpu_percent = self._proc.cpu_percent(interval=None)
        except psutil.Error:
            return None
        self.rss_mb = rss / 1_048_576
        if status == psutil.STATUS_ZOMBIE:
            return status
        if self.state is ChildState.RUNNING and self.rss_mb > self.policy.rss_limit_mb:
            self.stop(
                now,
                f"RSS {self.rss_mb:.0f} MB over the {self.policy.rss_limit_mb:g} MB "
                "limit: recycling",
                self.policy.stop_timeout_s,
            )
        return status

    def heartbeat_fresh(self, now: float, max_age_s: float) -> bool:
        """Whether this child counts as healthy for the systemd watchdog."""
        if self.state is ChildState.RUNNING:
            return self.beat is not None and self.beat.age_s <= max_age_s
        if self.state is ChildState.STARTING:
            return now - self.spawned_at <= self.policy.start_timeout_s
        if self.state is ChildState.STOPPING:
            return self.kill_at is None or now <= self.kill_at + max_age_s
        # No process: the respawn policy (and the alerts) handle it.
        return True

    def status(self, now: float) -> dict:
        """This child as the status socket shows it."""
        beat = self.beat
        return {
            "name": self.name,
            "state": self.state.name,
            "pid": self.pid,
            "uptime_s": _round(now - self.spawned_at if self.pid else None),
            # Milliseconds: when a respawned child became RUNNING.
            "state_for_s": round(now - self.state_since, 3),
            "restarts": self.restarts,
            "last_exit": self.last_exit or None,
            "rss_mb": _round(self.rss_mb),
            "cpu_percent": _round(self.cpu_percent),
            "heartbeat_age_s": _round(beat.age_s if beat and self.pid else None),
            "running_tasks": beat.running_tasks if beat and self.pid else 0,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
