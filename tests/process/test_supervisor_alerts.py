"""A role down longer than alerts.down_after_s: alert out, then the recovery."""

from __future__ import annotations

import os
import signal
import time

import pytest

from daemon.store.db import open_database
from daemon.store.models import Alert
from tests.helpers import wait_for
from tests.process.fixture_roles import AlertReceiver
from tests.process.fixture_roles import FixtureDaemon

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow


@pytest.mark.timeout(60)
def test_down_alert_and_recovery_reach_webhook_and_command(tmp_path, make_config):
    """Verify the alert POST and command, the alert row, and the recovery notice."""
    out = tmp_path / "alerts.out"
    with AlertReceiver() as receiver:
        daemon = FixtureDaemon(
            tmp_path,
            make_config,
            {
                "alerts": {
                    "down_after_s": 1.0,
                    "webhook_url": receiver.url,
                    "command": f'echo "$CAMPAIGND_ALERT_STATUS $CAMPAIGND_ALERT_KEY"'
                    f" >> {out}",
                },
                # Keep it crashing in BACKOFF (no FATAL) while the test watches.
                "supervisor": {"crash_loop_exits": 1000},
            },
            roles="web,scheduler",
        )
        try:
            daemon.start()
            daemon.set_flag("scheduler", "crash")
            os.kill(daemon.role("scheduler")["pid"], signal.SIGKILL)
            raised = receiver.wait_for(":scheduler", "raised")
            assert raised["key"].startswith("role_down:")
            assert "scheduler not running for" in raised["message"]
            assert raised["severity"] == "critical"

            daemon.clear_flag("scheduler", "crash")
            resolved = receiver.wait_for(":scheduler", "resolved")
            assert resolved["key"] == raised["key"]
            assert "running again" in resolved["message"]
            # Per key: on a busy machine a slow first start of another role
            # may raise (and resolve) its own role_down alert too.
            key = raised["key"]
            sent = [b["status"] for b in receiver.received if b["key"] == key]
            assert sent == ["raised", "resolved"]

            def command_runs():
                lines = out.read_text().splitlines() if out.exists() else []
                return [line.split()[0] for line in lines if line.endswith(key)]

            wait_for(
                lambda: len(command_runs()) == 2, what="the alert command ran twice"
            )
            assert command_runs() == ["raised", "resolved"]
        finally:
            daemon.close()
    database = open_database(daemon.cfg)
    try:
        with database.connection_context():
            [row] = Alert.select().where(Alert.key == raised["key"])
            assert row.resolved_at is not None
    finally:
        database.close()


@pytest.mark.timeout(90)
def test_a_role_that_keeps_dying_raises_role_flapping(tmp_path, make_config):
    """Killed again and again, but back RUNNING each time: never down for
    down_after_s, never FATAL, yet the operator hears of it."""
    with AlertReceiver() as receiver:
        daemon = FixtureDaemon(
            tmp_path,
            make_config,
            {
                "alerts": {
                    "down_after_s": 3600.0,
                    "restarts_per_hour": 2,
                    "webhook_url": receiver.url,
                },
                "supervisor": {"crash_loop_exits": 1000},
            },
            roles="web,scheduler",
        )
        try:
            daemon.start()
            for _ in range(3):
                pid = daemon.role("scheduler")["pid"]
                os.kill(pid, signal.SIGKILL)
                daemon.wait_role(
                    "scheduler",
                    lambda r, p=pid: r["state"] == "RUNNING" and r["pid"] != p,
                    timeout=20,
                    what="scheduler back",
                )
            raised = receiver.wait_for("role_flapping:", "raised", timeout=20)
            assert raised["key"].endswith(":scheduler")
            assert "exited unexpectedly 3 times in the last hour" in raised["message"]
            assert not [
                b
                for b in receiver.received
                if b["key"].startswith("role_") and "flapping" not in b["key"]
            ]
        finally:
            daemon.close()


@pytest.mark.timeout(90)
def test_heartbeat_url_is_pinged_while_healthy_and_falls_silent_when_not(
    tmp_path, make_config
):
    """The dead man's switch: pings while every role runs, none while one is
    down (the service behind the URL alerts on the silence)."""
    with AlertReceiver() as receiver:
        daemon = FixtureDaemon(
            tmp_path,
            make_config,
            {
                "alerts": {
                    "heartbeat_url": receiver.url,
                    "heartbeat_every_s": 1.0,
                    "down_after_s": 3600.0,
                },
                "supervisor": {"crash_loop_exits": 1000},
            },
            roles="web,scheduler",
        )
        try:
            daemon.start()
            wait_for(lambda: len(receiver.received) >= 2, timeout=30, what="two pings")
            ping = receiver.received[0]
            assert ping["status"] == "ok" and ping["roles"] == 2
            daemon.set_flag("scheduler", "crash")
            before = daemon.role("scheduler")
            down_since = time.time()
            os.kill(before["pid"], signal.SIGKILL)
            # Six more crashes: with the backoff (0.1 s doubling) and each
            # start, the role has been down for several ping intervals.
            daemon.wait_role(
                "scheduler",
                lambda r: r["restarts"] >= before["restarts"] + 6,
                timeout=60,
                what="scheduler crashing for a while",
            )
            late = [p for p in receiver.received if p["at"] > down_since + 1.5]
            assert late == [], late
            daemon.clear_flag("scheduler", "crash")
            daemon.wait_role("scheduler", lambda r: r["state"] == "RUNNING", timeout=30)
            back = time.time()
            wait_for(
                lambda: any(p["at"] > back for p in receiver.received),
                timeout=20,
                what="pings again",
            )
        finally:
            daemon.close()
