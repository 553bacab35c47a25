"""Stopping: SIGTERM drains, stragglers get SIGKILL, nothing is ever orphaned."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from tests.helpers import free_port
from tests.helpers import wait_for
from tests.process.fixture_roles import FixtureDaemon

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow

# The supervisor's log line for a SIGKILL it sends to a role
# (daemon/supervision/child.py).
SIGKILL_LINE = re.compile(r"(\S+): SIGKILL pid (\d+) \(([^)]*)\)")


def sigkills(log: str) -> list[tuple[str, int, str]]:
    """(role, pid, reason) of every SIGKILL the supervisor sent to a role."""
    return [(m[1], int(m[2]), m[3]) for m in SIGKILL_LINE.finditer(log)]


@pytest.fixture
def make_daemon(tmp_path, make_config):
    made = []

    def build(extra=None, **kw):
        d = FixtureDaemon(tmp_path, make_config, extra, **kw)
        made.append(d)
        return d

    yield build
    for d in made:
        d.close()


@pytest.mark.timeout(60)
def test_sigterm_stops_everything_within_the_timeout(make_daemon, capfd):
    """Verify SIGTERM: every child drains (STOP marker), exit 0, no orphan."""
    daemon = make_daemon().start()
    pids = {r["pid"] for r in daemon.status()["roles"]}
    capfd.readouterr()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=30) == 0
    stopped = {pid for what, _, pid in daemon.events() if what == "STOP"}
    assert pids <= stopped
    # Within the timeout: no child had to be SIGKILLed at the stop deadline.
    assert sigkills(capfd.readouterr().err) == []
    assert daemon.live_children() == []
    assert not daemon.socket_path.exists()


@pytest.mark.timeout(60)
def test_a_child_ignoring_sigterm_is_killed_at_the_stop_timeout(make_daemon, capfd):
    """Verify the stop protocol's SIGKILL after daemon.stop_timeout_s."""
    daemon = make_daemon({"daemon": {"stop_timeout_s": 1.5}}).start(wait_running=False)
    daemon.set_flag("worker:retry", "ignore_term")
    daemon.wait_all_running()
    os.kill(daemon.role("worker:retry")["pid"], signal.SIGKILL)
    daemon.wait_role(
        "worker:retry", lambda r: r["state"] == "RUNNING" and r["restarts"] == 1
    )
    straggler = daemon.role("worker:retry")["pid"]
    others = {r["pid"] for r in daemon.status()["roles"]} - {straggler}
    capfd.readouterr()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=30) == 0
    assert daemon.live_children() == []
    # The others drained on SIGTERM; only the straggler got the SIGKILL, and
    # only once its grace was over (the supervisor logs how long it waited).
    stopped = {pid for what, _, pid in daemon.events() if what == "STOP"}
    assert others <= stopped and straggler not in stopped
    [(role, pid, reason)] = sigkills(capfd.readouterr().err)
    assert (role, pid) == ("worker:retry", straggler)
    waited = re.fullmatch(r"still alive ([\d.]+)s after SIGTERM", reason)
    assert waited and float(waited[1]) >= 1.5, reason


@pytest.mark.timeout(60)
def test_second_sigint_kills_at_once(make_daemon, capfd):
    """Verify a second SIGINT escalates instead of waiting for the timeout."""
    daemon = make_daemon({"daemon": {"stop_timeout_s": 30.0}})
    daemon.set_flag("all", "ignore_term")
    daemon.start()
    pids = {r["pid"] for r in daemon.status()["roles"]}
    capfd.readouterr()
    daemon.signal(signal.SIGINT)
    wait_for(lambda: daemon.try_status()["daemon"]["state"] == "stopping")
    daemon.signal(signal.SIGINT)
    # Well before the 30 s stop timeout (the test's own timeout is 60 s).
    assert daemon.wait_exit(timeout=20) == 0
    assert daemon.live_children() == []
    # Every child was killed because of the second SIGINT, not the timeout.
    killed = sigkills(capfd.readouterr().err)
    assert {pid for _, pid, _ in killed} == pids
    assert {reason for _, _, reason in killed} == {"second interrupt"}


@pytest.mark.timeout(60)
def test_sigkill_of_the_supervisor_takes_the_children_along(make_daemon):
    """Verify no orphan survives a SIGKILLed supervisor; the web port is free."""
    port = free_port()
    daemon = make_daemon().start(env={"FIXTURE_WEB_PORT": str(port)})
    with pytest.raises(OSError):
        socket.create_server(("127.0.0.1", port)).close()
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(timeout=5)
    wait_for(lambda: daemon.live_children() == [], timeout=10, what="no orphans")
    socket.create_server(("127.0.0.1", port)).close()
    # The next daemon finds the stale socket path and takes it over.
    again = make_daemon(roles="web").start(env={"FIXTURE_WEB_PORT": str(port)})
    assert again.status()["daemon"]["pid"] == again.proc.pid


@pytest.mark.timeout(60)
def test_config_error_exit_stops_the_daemon_with_code_2(make_daemon):
    """Verify a child exiting with EXIT_CONFIG halts everything, exit code 2."""
    daemon = make_daemon().start()
    daemon.set_flag("scheduler", "exit2")
    os.kill(daemon.role("scheduler")["pid"], signal.SIGKILL)
    assert daemon.wait_exit(timeout=20) == 2
    assert daemon.live_children() == []
