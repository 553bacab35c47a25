"""Health policy with real processes: crash loop, stale heartbeat, RSS, hard limit."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import wait_for
from tests.process.fixture_roles import FixtureDaemon

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow

FEW_ROLES = "web,worker:default,worker:messages#1,scheduler"


@pytest.fixture
def make_daemon(tmp_path, make_config):
    made = []

    def build(extra=None, roles=FEW_ROLES):
        d = FixtureDaemon(tmp_path, make_config, extra, roles=roles)
        made.append(d)
        return d

    yield build
    for d in made:
        d.close()


@pytest.mark.timeout(60)
def test_crash_loop_backoff_fatal_alert_then_retry(make_daemon):
    """Verify crash loop -> BACKOFF -> FATAL + alert -> retried after cool-down."""
    daemon = make_daemon().start()
    daemon.set_flag("scheduler", "crash")
    os.kill(daemon.role("scheduler")["pid"], signal.SIGKILL)
    seen = set()

    def fatal(role):
        seen.add(role["state"])
        return role["state"] == "FATAL"

    daemon.wait_role("scheduler", fatal, timeout=15, what="scheduler FATAL")
    assert "BACKOFF" in seen or "STARTING" in seen
    host_key = f":{daemon.status()['daemon']['host']}:scheduler"

    def alerted():
        keys = [a["key"] for a in daemon.status()["alerts"]]
        return f"role_fatal{host_key}" in keys

    wait_for(alerted, timeout=10, what="FATAL alert on the status socket")
    daemon.clear_flag("scheduler", "crash")
    back = daemon.wait_role(
        "scheduler",
        lambda r: r["state"] == "RUNNING",
        timeout=15,
        what="retried after the cool-down",
    )
    assert back["restarts"] >= 4
    wait_for(lambda: not alerted(), timeout=10, what="alert resolved")


@pytest.mark.timeout(60)
def test_stale_heartbeat_is_stopped_and_replaced(make_daemon):
    """Verify a child that stops beating is replaced (SIGTERM, then respawn)."""
    daemon = make_daemon().start()
    old = daemon.role("worker:default")["pid"]
    daemon.set_flag("worker:default", "hang", pid=old)
    back = daemon.wait_role(
        "worker:default",
        lambda r: r["state"] == "RUNNING" and r["pid"] != old,
        timeout=20,
        what="replacement of the hung child",
    )
    assert ("STOP", "worker:default", old) in daemon.events()  # got SIGTERM
    assert back["restarts"] == 1


@pytest.mark.timeout(60)
def test_rss_over_the_limit_is_recycled_gracefully(make_daemon):
    """Verify RSS > workers.rss_limit_mb -> SIGTERM, drain, replacement."""
    daemon = make_daemon({"workers": {"rss_limit_mb": 64}}).start()
    old = daemon.role("worker:messages#1")["pid"]
    daemon.set_flag("worker:messages#1", "grow", pid=old)
    back = daemon.wait_role(
        "worker:messages#1",
        lambda r: r["state"] == "RUNNING" and r["pid"] != old,
        timeout=20,
        what="recycled worker",
    )
    assert back["last_exit"] == "exited 0"
    assert ("STOP", "worker:messages#1", old) in daemon.events()
    # Recycling is planned: RESTARTS counts unplanned exits only.
    assert back["restarts"] == 0


@pytest.mark.timeout(60)
def test_task_past_the_hard_limit_drains_the_child(make_daemon):
    """Verify a task older than workers.hard_time_limit_s -> SIGTERM (the
    worker drains and exits by itself), respawn."""
    daemon = make_daemon(
        {
            "workers": {"hard_time_limit_s": 2.0, "soft_time_limit_s": 1.5},
            "provider": {"timeout_s": 1.0},
        }
    ).start()
    old = daemon.role("worker:messages#1")["pid"]
    daemon.set_flag("worker:messages#1", "task", pid=old)
    back = daemon.wait_role(
        "worker:messages#1",
        lambda r: r["state"] == "RUNNING" and r["pid"] != old,
        timeout=20,
        what="replacement after the hard limit",
    )
    assert back["last_exit"] == "exited 0"
    assert ("STOP", "worker:messages#1", old) in daemon.events()  # got SIGTERM


@pytest.mark.timeout(60)
def test_stuck_child_past_the_hard_limit_is_killed_after_the_stop_timeout(
    make_daemon,
):
    """Verify a worker that does not drain (ignores SIGTERM) still dies: SIGKILL
    at daemon.stop_timeout_s after the hard limit's SIGTERM."""
    daemon = make_daemon(
        {
            "daemon": {"stop_timeout_s": 2.0},
            "workers": {"hard_time_limit_s": 2.0, "soft_time_limit_s": 1.5},
            "provider": {"timeout_s": 1.0},
        }
    )
    daemon.set_flag("worker:messages#1", "ignore_term")
    daemon.start()
    old = daemon.role("worker:messages#1")["pid"]
    daemon.set_flag("worker:messages#1", "task", pid=old)
    daemon.wait_role(
        "worker:messages#1",
        lambda r: r["state"] == "STOPPING",
        timeout=10,
        what="hard limit: STOPPING",
    )
    back = daemon.wait_role(
        "worker:messages#1",
        lambda r: r["state"] == "RUNNING" and r["pid"] != old,
        timeout=20,
        what="replacement after the stop timeout",
    )
    assert back["last_exit"] == "killed by SIGKILL"
    assert ("STOP", "worker:messages#1", old) not in daemon.events()
    daemon.clear_flag("worker:messages#1", "ignore_term")
