"""The child state machine and respawn policy, driven by injected time.

No process is started: a fake OS seam records spawns and signals, exits are
fed in as waitpid statuses, heartbeats are a real file whose mtime we set.
"""

from __future__ import annotations

import os
import signal

import pytest

from daemon.runtime import HEARTBEAT_ENV
from daemon.supervision.child import Child
from daemon.supervision.child import ChildPolicy
from daemon.supervision.child import RoleSpec
from daemon.supervision.child import describe_exit
from daemon.supervision.child import read_beat
from daemon.supervision.states import ChildState

S = ChildState
WALL = 1_700_000_000.0


def exited(code: int) -> int:
    return code << 8


def killed(sig: int) -> int:
    return sig


class FakeProcesses:
    """Records what the child asks of the OS."""

    def __init__(self):
        self.next_pid = 1000
        self.spawned: list[tuple[tuple, dict]] = []
        self.signals: list[tuple[int, int, bool]] = []
        self.fail_spawn = False

    def spawn(self, argv, env) -> int:
        if self.fail_spawn:
            raise FileNotFoundError(2, "No such file or directory")
        self.next_pid += 1
        self.spawned.append((argv, env))
        return self.next_pid

    def signal(self, pid, sig, group=False) -> None:
        self.signals.append((pid, sig, group))


def make_policy(**overrides) -> ChildPolicy:
    values = dict(
        backoff_initial_s=0.1,
        backoff_max_s=60.0,
        healthy_after_s=60.0,
        crash_loop_exits=10,
        crash_loop_window_s=300.0,
        fatal_cooldown_s=300.0,
        start_timeout_s=30.0,
        heartbeat_interval_s=5.0,
        heartbeat_timeout_s=30.0,
        stop_timeout_s=20.0,
        unhealthy_grace_s=5.0,
        hard_time_limit_s=90.0,
        rss_limit_mb=512.0,
    )
    values.update(overrides)
    return ChildPolicy(**values)


@pytest.fixture
def ops():
    return FakeProcesses()


@pytest.fixture
def make_child(tmp_path, ops):
    def build(**policy) -> Child:
        spec = RoleSpec("web", ("/usr/bin/python3", "-m", "daemon", "child", "web"))
        return Child(spec, make_policy(**policy), tmp_path / "web.heartbeat", ops)

    return build


def beat(child: Child, age: float = 0.0, oldest: float = 0.0, running: int = 0):
    child.heartbeat_path.write_text(f"{oldest:.3f} {running}\n")
    os.utime(child.heartbeat_path, (WALL - age, WALL - age))


def running_child(make_child, now: float = 0.0, **policy) -> Child:
    child = make_child(**policy)
    child.transition(now)
    beat(child)
    child.check_heartbeat(now, WALL)
    assert child.state is S.RUNNING
    return child


# ------------------------------------------------------------------- start


def test_first_transition_spawns_with_the_heartbeat_file(make_child, ops):
    """Verify that a new child is spawned at once and told where to beat."""
    child = make_child()
    child.transition(now=0.0)
    assert child.state is S.STARTING
    assert child.pid == 1001
    argv, env = ops.spawned[0]
    assert argv[-1] == "web"
    assert env[HEARTBEAT_ENV] == str(child.heartbeat_path)
    assert child.restarts == 0


def test_running_needs_a_real_first_beat(make_child):
    """Verify that an empty heartbeat file (created, never beaten) is not a beat."""
    child = make_child()
    child.transition(0.0)
    child.heartbeat_path.touch()
    child.check_heartbeat(0.5, WALL)
    assert child.state is S.STARTING
    beat(child)
    child.check_heartbeat(0.6, WALL)
    assert child.state is S.RUNNING
    assert child.down_since is None


def test_a_heartbeat_left_by_the_previous_process_does_not_count(make_child):
    """Verify that spawn() removes the old heartbeat file."""
    child = running_child(make_child)
    child.finish(killed(signal.SIGKILL), 5.0)
    child.transition(5.0)
    assert child.state is S.STARTING
    child.check_heartbeat(5.01, WALL)
    assert child.state is S.STARTING


def test_no_heartbeat_within_start_timeout_stops_the_child(make_child, ops):
    """Verify that a child stuck starting is stopped and counted as a failure."""
    child = make_child(start_timeout_s=30.0)
    child.transition(0.0)
    child.check_heartbeat(31.0, WALL)
    assert child.state is S.STOPPING
    assert ops.signals[-1] == (child.pid, signal.SIGTERM, False)
    child.finish(exited(0), 31.5)
    assert child.state is S.EXITED


# ---------------------------------------------------------------- respawn


def test_first_restart_is_immediate(make_child, ops):
    """Verify that one SIGKILL gets a replacement in the same pass."""
    child = running_child(make_child)
    words = child.finish(killed(signal.SIGKILL), 10.0)
    assert words == "killed by SIGKILL (out of memory?)"
    assert child.state is S.EXITED
    child.transition(10.0)
    assert child.state is S.STARTING
    assert child.restarts == 1
    assert len(ops.spawned) == 2


def test_backoff_doubles_from_initial_and_caps(make_child):
    """Verify the delays 0, 0.1, 0.2, 0.4 ... up to backoff_max_s."""
    child = make_child(crash_loop_exits=1000, backoff_max_s=1.0)
    now = 0.0
    child.transition(now)
    delays = []
    for _ in range(7):
        now += 0.05  # a quick failure each time
        child.finish(exited(1), now)
        child.transition(now)
        if child.state is S.BACKOFF:
            delays.append(round(child.retry_at - now, 3))
            assert child.next_deadline(now) == child.retry_at
            child.transition(child.retry_at - 0.001)
            assert child.state is S.BACKOFF
            now = child.retry_at
            child.transition(now)
        else:
            delays.append(0.0)
        assert child.state is S.STARTING
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_resets_after_a_healthy_period(make_child):
    """Verify that staying RUNNING for healthy_after_s forgets past failures."""
    child = running_child(make_child, healthy_after_s=60.0)
    for t in (1.0, 2.0):
        child.finish(exited(1), t)
        child.transition(t + 1.0)
    assert child.failures == 2
    child.transition(4.0)  # BACKOFF (0.1 s) over
    beat(child)
    child.check_heartbeat(4.0, WALL)
    assert child.state is S.RUNNING
    assert child.next_deadline(4.0) == 64.0
    child.transition(63.9)
    assert child.failures == 2
    child.transition(64.0)
    assert child.failures == 0
    child.finish(exited(1), 70.0)
    child.transition(70.0)
    assert child.state is S.STARTING  # immediate again


def test_crash_loop_goes_fatal_then_retries_after_cool_down(make_child):
    """Verify exits -> FATAL -> a fresh try once fatal_cooldown_s has passed."""
    child = make_child(
        crash_loop_exits=3, backoff_initial_s=0.0, fatal_cooldown_s=100.0
    )
    now = 0.0
    child.transition(now)
    for _ in range(3):
        now += 1.0
        child.finish(exited(1), now)
        child.transition(now)
    assert child.state is S.FATAL
    assert child.retry_at == now + 100.0
    child.transition(now + 99.0)
    assert child.state is S.FATAL
    child.transition(now + 100.0)
    assert child.state is S.STARTING
    assert not child.exits and child.failures == 0


def test_exits_outside_the_window_do_not_count(make_child):
    """Verify that the crash-loop window slides."""
    child = make_child(
        crash_loop_exits=3, crash_loop_window_s=10.0, backoff_initial_s=0.0
    )
    now = 0.0
    child.transition(now)
    for _ in range(6):
        now += 6.0
        child.finish(exited(1), now)
        child.transition(now)
        assert child.state is not S.FATAL


def test_spawn_failure_counts_as_an_exit(make_child, ops):
    """Verify that an exec failure backs off like a crash instead of raising."""
    ops.fail_spawn = True
    child = make_child(crash_loop_exits=1000)
    child.transition(0.0)
    assert child.state is S.EXITED
    assert child.last_exit.startswith("spawn failed")
    child.transition(0.0)
    assert child.state is S.EXITED  # restarted at once, failed again
    child.transition(0.0)
    assert child.state is S.BACKOFF


# ------------------------------------------------------------------ stops


def test_requested_stop_then_respawn_is_a_recycle(make_child, ops):
    """Verify SIGTERM -> STOPPED -> respawn, without counting a failure."""
    child = running_child(make_child)
    child.stop(5.0, "RSS over limit", grace_s=20.0)
    assert child.state is S.STOPPING
    assert ops.signals == [(1001, signal.SIGTERM, False)]
    child.finish(exited(0), 6.0)
    assert child.state is S.STOPPED
    assert child.failures == 0 and not child.exits
    child.transition(6.0)
    assert child.state is S.STARTING


def test_stop_escalates_to_sigkill_of_the_group_after_the_grace(make_child, ops):
    """Verify that a child ignoring SIGTERM is SIGKILLed at its deadline."""
    child = running_child(make_child)
    child.stop(5.0, "shutdown", grace_s=20.0, restart=False)
    assert child.next_deadline(5.0) == 25.0
    child.transition(24.9)
    assert len(ops.signals) == 1
    child.transition(25.0)
    assert (1001, signal.SIGKILL, True) in ops.signals
    assert child.killed and child.next_deadline(25.0) is None
    words = child.finish(killed(signal.SIGKILL), 25.1)
    assert words == "killed by SIGKILL"  # no OOM hint: we did it
    assert child.state is S.STOPPED
    child.transition(30.0)
    assert child.state is S.STOPPED  # shutdown: no respawn


def test_shutdown_parks_waiting_children(make_child):
    """Verify that BACKOFF/EXITED/FATAL children go STOPPED when not respawning."""
    child = running_child(make_child)
    child.finish(exited(1), 1.0)
    child.transition(1.0, respawn=False)
    assert child.state is S.STOPPED


def test_stale_heartbeat_is_a_failure(make_child, ops):
    """Verify stale beat -> SIGTERM, short grace -> SIGKILL, exit counts."""
    child = running_child(make_child, heartbeat_timeout_s=30.0)
    beat(child, age=31.0)
    child.check_heartbeat(40.0, WALL)
    assert child.state is S.STOPPING
    assert child.kill_at == 45.0  # unhealthy_grace_s
    child.transition(45.0)
    assert ops.signals[-1][1] == signal.SIGKILL
    child.finish(killed(signal.SIGKILL), 45.1)
    assert child.state is S.EXITED
    assert len(child.exits) == 1


def test_task_past_the_hard_limit_drains_the_worker(make_child, ops):
    """Verify a task past the hard limit -> SIGTERM (the worker drains: its
    other threads finish their sends), SIGKILL only at the stop timeout."""
    child = running_child(make_child, hard_time_limit_s=90.0, stop_timeout_s=20.0)
    beat(child, oldest=WALL - 89.0, running=2)
    child.check_heartbeat(10.0, WALL)
    assert child.state is S.RUNNING
    beat(child, oldest=WALL - 91.0, running=2)
    child.check_heartbeat(11.0, WALL)
    assert child.state is S.STOPPING
    assert ops.signals[-1] == (1001, signal.SIGTERM, False)
    assert not child.killed
    assert "hard limit" in child.stop_reason
    assert child.kill_at == 31.0  # stop_timeout_s
    child.check_heartbeat(12.0, WALL + 1.0)  # still draining: no SIGKILL yet
    assert not child.killed
    # The other threads finished, the worker exited by itself.
    child.finish(exited(0), 20.0)
    assert child.state is S.EXITED  # a health stop counts as a failure
    assert len(child.exits) == 1
    child.transition(20.0)
    assert child.state is S.STARTING


def test_stuck_worker_past_the_hard_limit_is_killed_at_the_stop_timeout(
    make_child, ops
):
    """Verify a draining worker that does not exit is SIGKILLed at the deadline."""
    child = running_child(make_child, hard_time_limit_s=90.0, stop_timeout_s=20.0)
    beat(child, oldest=WALL - 91.0, running=1)
    child.check_heartbeat(11.0, WALL)
    child.transition(30.9)
    assert not child.killed
    child.transition(31.0)
    assert child.killed
    assert ops.signals[-1] == (1001, signal.SIGKILL, False)
    assert (1001, signal.SIGKILL, True) in ops.signals
    assert child.finish(killed(signal.SIGKILL), 31.1) == "killed by SIGKILL"
    assert child.state is S.EXITED


def test_hard_limit_holds_while_stopping_with_a_long_grace(make_child, ops):
    """Verify a STOPPING child whose task outlives the hard limit plus one stop
    timeout and one heartbeat interval (a lease covers them) is SIGKILLed,
    whatever its stop grace."""
    child = running_child(make_child, hard_time_limit_s=90.0, stop_timeout_s=20.0)
    beat(child, oldest=WALL - 60.0, running=1)
    child.stop(0.0, "daemon stopping", grace_s=600.0, restart=False)
    assert child.state is S.STOPPING and not child.killed
    beat(child, oldest=WALL - 114.0, running=1)
    child.check_heartbeat(5.0, WALL)
    assert not child.killed
    beat(child, oldest=WALL - 116.0, running=1)
    child.check_heartbeat(6.0, WALL)
    assert child.killed
    assert ops.signals[-1][1] == signal.SIGKILL
    child.finish(killed(signal.SIGKILL), 6.1)
    assert child.state is S.STOPPED  # the stop was asked for: no respawn


def test_illegal_move_is_refused(make_child):
    """Verify that change_state() asserts the source state."""
    child = make_child()
    with pytest.raises(AssertionError, match="STOPPED -> RUNNING"):
        child.change_state(S.RUNNING, "no", 0.0)


# ------------------------------------------------------------ observation


def test_down_since_tracks_leaving_running(make_child):
    """Verify the clock the down-alert uses."""
    child = running_child(make_child, now=1.0)
    assert child.down_since is None
    child.finish(exited(1), 7.0)
    assert child.down_since == 7.0
    child.transition(7.0)
    assert child.down_since == 7.0  # still down while STARTING


def test_heartbeat_fresh_for_the_watchdog(make_child):
    """Verify: RUNNING needs a recent beat; STARTING within its timeout is fine."""
    child = make_child(start_timeout_s=30.0)
    child.transition(0.0)
    assert child.heartbeat_fresh(10.0, 2.0)
    assert not child.heartbeat_fresh(31.0, 2.0)
    beat(child, age=1.0)
    child.check_heartbeat(1.0, WALL)
    assert child.heartbeat_fresh(1.0, 2.0)
    beat(child, age=3.0)
    child.check_heartbeat(2.0, WALL)
    assert not child.heartbeat_fresh(2.0, 2.0)


def test_status_dict(make_child):
    """Verify the fields the status socket shows for a role."""
    child = running_child(make_child, now=1.0)
    status = child.status(4.0)
    assert status["name"] == "web"
    assert status["state"] == "RUNNING"
    assert status["pid"] == 1001
    assert status["uptime_s"] == 3.0
    assert status["restarts"] == 0


def test_read_beat_parses_the_runtime_format(tmp_path):
    """Verify the reader against what runtime.Heartbeat writes."""
    from daemon.runtime import Heartbeat

    path = tmp_path / "hb"
    hb = Heartbeat(str(path))
    assert read_beat(path, WALL) is None
    hb.beat(1234.5, 3)
    beat_ = read_beat(path, os.stat(path).st_mtime + 2.0)
    assert beat_.oldest_task_started == 1234.5
    assert beat_.running_tasks == 3
    assert beat_.age_s == pytest.approx(2.0)
    hb.close()


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (exited(0), "exited 0"),
        (exited(1), "exited 1"),
        (exited(2), "exited 2"),
        (killed(signal.SIGTERM), "killed by SIGTERM"),
        (killed(signal.SIGKILL), "killed by SIGKILL (out of memory?)"),
        (killed(signal.SIGSEGV), "killed by SIGSEGV"),
    ],
)
def test_describe_exit(status, words):
    """Verify that waitpid statuses read as words."""
    assert describe_exit(status)[0] == words


class FakeZygote:
    """A zygote seam: forks `pid` once, then is not ready."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.forked: list[tuple[str, str, float]] = []

    def fork_role(self, role, heartbeat_path, now) -> int | None:
        pid, self.pid = self.pid, None
        if pid is not None:
            self.forked.append((role, str(heartbeat_path), now))
        return pid


def test_respawn_is_forked_by_the_zygote_instead_of_exec(make_child, ops):
    """Verify that a respawn takes the pid the zygote forked (no exec) and is
    STARTING until its first beat, like an exec'ed child."""
    child = running_child(make_child)
    child.zygote = FakeZygote(4242)
    child.finish(killed(signal.SIGKILL), 5.0)
    child.transition(5.0)
    assert child.state is S.STARTING
    assert child.pid == 4242
    assert child.spawned_at == 5.0
    assert child.restarts == 1
    assert len(ops.spawned) == 1  # only the first start was exec'ed
    assert child.zygote.forked == [("web", str(child.heartbeat_path), 5.0)]
    assert not child.heartbeat_path.exists()  # the old beat does not count
    beat(child)
    child.check_heartbeat(5.05, WALL)
    assert child.state is S.RUNNING
    child.kill(6.0, "test")
    assert ops.signals[-2:] == [
        (4242, signal.SIGKILL, True),
        (4242, signal.SIGKILL, False),
    ]


def test_without_a_ready_zygote_the_respawn_is_exec_ed(make_child, ops):
    """Verify the fallback: no zygote ready -> a normal exec spawn."""
    child = running_child(make_child)
    child.zygote = FakeZygote(None)
    child.finish(killed(signal.SIGKILL), 5.0)
    child.transition(5.0)
    assert child.state is S.STARTING
    assert child.pid == 1002
    assert len(ops.spawned) == 2


BEAT_TWICE = """
import sys
from daemon.runtime import Heartbeat
hb = Heartbeat(sys.argv[1])
hb.beat()
hb.beat()
"""


@pytest.mark.parametrize("named", [True, False], ids=["supervisor", "other-pid"])
def test_the_first_beat_signals_the_parent_only_if_it_is_the_supervisor(
    tmp_path, named
):
    """A child's first heartbeat sends FIRST_BEAT_SIGNAL to its parent once;
    never when the parent is not the supervisor its environment names (a pid
    from the environment alone may belong to anyone by now)."""
    import subprocess
    import sys

    from daemon.runtime import FIRST_BEAT_SIGNAL
    from daemon.runtime import SUPERVISOR_PID_ENV

    received = []
    previous = signal.signal(FIRST_BEAT_SIGNAL, lambda *_: received.append(1))
    try:
        env = {
            **os.environ,
            HEARTBEAT_ENV: "",
            SUPERVISOR_PID_ENV: str(os.getpid() if named else os.getppid()),
        }
        subprocess.run(
            [sys.executable, "-c", BEAT_TWICE, str(tmp_path / "hb")],
            env=env,
            check=True,
            timeout=30,
        )
    finally:
        signal.signal(FIRST_BEAT_SIGNAL, previous)
    assert received == ([1] if named else [])


def test_a_retired_process_and_its_successor_each_get_their_own_last_words(
    make_child, ops, monkeypatch
):
    """A replaced web role: the old process drains while its successor, on
    the same heartbeat path, fails at once (its port taken); each exit shows
    the words of its own process, whichever is reaped first."""
    from daemon.runtime import say_last_words

    old = running_child(make_child)
    old.stop(5.0, "config reload", grace_s=20.0)
    new = old.successor("config reload")
    new.transition(5.0)
    assert (old.pid, new.pid) == (1001, 1002)

    monkeypatch.setenv(HEARTBEAT_ENV, str(new.heartbeat_path))
    monkeypatch.setattr(os, "getpid", lambda: 1002)
    say_last_words("cannot listen on 127.0.0.1:8080")
    monkeypatch.setattr(os, "getpid", lambda: 1001)
    say_last_words("drained")

    assert old.finish(exited(0), 6.0) == "exited 0: drained"
    assert new.finish(exited(1), 6.0) == "exited 1: cannot listen on 127.0.0.1:8080"
