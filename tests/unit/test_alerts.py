"""Alerts: rows in a real SQLite database, a real HTTP receiver, a real command."""

from __future__ import annotations

import json
import types

import pytest

from daemon.domain import alerts
from daemon.store.db import open_database
from daemon.store.models import Alert
from daemon.supervision.role_alerts import RoleAlerts
from daemon.supervision.states import ChildState
from tests.helpers import wait_for
from tests.process.fixture_roles import AlertReceiver


@pytest.fixture
def db(make_config):
    cfg = make_config("sqlite")
    database = open_database(cfg, migrate_schema=True)
    yield cfg
    database.close()


def test_raise_is_recorded_once_per_key(db):
    """Verify that raising an active key again adds no row and returns False."""
    assert alerts.raise_alert("role_down:h:web", "web down for 300s")
    assert not alerts.raise_alert("role_down:h:web", "web down for 310s")
    assert Alert.select().count() == 1
    active = alerts.active_alerts()
    assert [a["key"] for a in active] == ["role_down:h:web"]
    assert active[0]["severity"] == "critical"


def test_resolve_closes_the_row_and_a_new_raise_opens_another(db):
    """Verify the raise -> resolve -> raise cycle."""
    alerts.raise_alert("k", "first")
    assert alerts.resolve_alert("k")
    assert not alerts.resolve_alert("k")
    assert alerts.active_alerts() == []
    assert alerts.raise_alert("k", "second", severity="warning")
    assert Alert.select().count() == 2
    assert alerts.active_keys("k") == ["k"]


def test_session_keeps_a_connection_the_caller_opened(db):
    """Verify that db_session() does not close the caller's connection."""
    from daemon.store.models import database

    database.connect()
    try:
        alerts.raise_alert("x", "y")
        assert not database.is_closed()
    finally:
        database.close()


def test_raise_with_cfg_posts_to_the_webhook_and_runs_the_command(
    make_config, tmp_path
):
    """Verify the notices reach a local HTTP receiver and the alert command."""
    out = tmp_path / "command.out"
    with AlertReceiver() as receiver:
        cfg = make_config(
            "sqlite",
            {
                "alerts": {
                    "webhook_url": receiver.url,
                    "command": 'echo "$CAMPAIGND_ALERT_STATUS $CAMPAIGND_ALERT_KEY"'
                    f" >> {out}",
                }
            },
        )
        database = open_database(cfg, migrate_schema=True)
        try:
            alerts.raise_alert("health:provider", "provider unreachable", cfg=cfg)
            body = receiver.wait_for("health:provider", "raised")
            assert body["message"] == "provider unreachable"
            assert "RAISED" in body["text"]
            alerts.resolve_alert("health:provider", cfg=cfg)
            receiver.wait_for("health:provider", "resolved")
        finally:
            database.close()
    wait_for(
        lambda: out.exists() and len(out.read_text().splitlines()) == 2,
        what="two command runs",
    )
    assert out.read_text().splitlines() == [
        "raised health:provider",
        "resolved health:provider",
    ]


def test_webhook_failure_is_logged_not_raised(caplog):
    """Verify that an unreachable receiver costs a warning, nothing more."""
    event = alerts.AlertEvent.now("k", alerts.RAISED, "m")
    assert not alerts.post_webhook("http://127.0.0.1:9/x", event, timeout=1.0)
    assert "alert webhook" in caplog.text


def test_event_env_carries_the_json():
    """Verify the variables the alert command receives."""
    event = alerts.AlertEvent.now("k", alerts.RESOLVED, "back")
    env = event.env()
    assert env["CAMPAIGND_ALERT_STATUS"] == "resolved"
    assert json.loads(env["CAMPAIGND_ALERT_JSON"])["message"] == "back"


# ------------------------------------------------------------ role alerts


def role(name, state, down_since=None, retry_at=None, exits=(), unplanned=()):
    return types.SimpleNamespace(
        name=name,
        state=state,
        pid=42,
        down_since=down_since,
        retry_at=retry_at,
        exits=list(exits),
        unplanned_exits=list(unplanned),
        last_exit="exited 1",
    )


def test_a_role_that_keeps_dying_raises_flapping_though_never_down_long():
    """One exit every 5 minutes: never down for down_after_s, never FATAL."""
    policy = RoleAlerts("h", down_after_s=300.0, restarts_per_hour=10)
    exits = [i * 300.0 for i in range(11)]  # 11 exits within the hour
    web = role("web", ChildState.RUNNING, unplanned=exits[:10])
    assert policy.check([web], 2700.0) == []  # 10: not more than 10
    web.unplanned_exits = exits
    [(key, status, message)] = policy.check([web], 3000.0)
    assert (key, status) == ("role_flapping:h:web", alerts.RAISED)
    assert "exited unexpectedly 11 times in the last hour" in message
    assert policy.check([web], 3001.0) == []  # raised once
    assert policy.check([web], 4800.0) == []  # 7 in the hour: still raised
    # Calm again: 5 exits left in the last hour (half of 10) -> resolved.
    [(key, status, _)] = policy.check([web], 5400.0)
    assert (key, status) == ("role_flapping:h:web", alerts.RESOLVED)


def test_role_down_longer_than_threshold_raises_then_resolves():
    """Verify role_down after down_after_s, once, and its recovery."""
    policy = RoleAlerts("h", down_after_s=300.0)
    web = role("web", ChildState.BACKOFF, down_since=100.0)
    assert policy.next_deadline([web]) == 400.0
    assert policy.check([web], 399.0) == []
    [(key, status, message)] = policy.check([web], 400.0)
    assert (key, status) == ("role_down:h:web", alerts.RAISED)
    assert "not running for 300s" in message
    assert policy.check([web], 500.0) == []
    assert policy.next_deadline([web]) is None
    web.state, web.down_since = ChildState.RUNNING, None
    assert policy.check([web], 501.0) == [
        ("role_down:h:web", alerts.RESOLVED, "web is running again (pid 42)")
    ]


def test_fatal_raises_at_once():
    """Verify that FATAL does not wait for the down threshold."""
    policy = RoleAlerts("h", down_after_s=300.0)
    web = role(
        "web", ChildState.FATAL, down_since=10.0, retry_at=310.0, exits=[1, 2, 3]
    )
    [(key, status, message)] = policy.check([web], 11.0)
    assert key == "role_fatal:h:web"
    assert "FATAL after 3 exits" in message
    assert "next try in 299s" in message


def test_running_roles_raise_nothing():
    """Verify that healthy roles produce no alert."""
    policy = RoleAlerts("h", down_after_s=0.1)
    assert policy.check([role("web", ChildState.RUNNING)], 1000.0) == []
