"""Alerts: a CRITICAL log line, a row in the `alert` table, optional notices.

Any process that opened the database can raise one (the supervisor for roles
that are down or FATAL, the scheduler's health check for the rest):

    raise_alert("role_down:host1:web", "web not running for 312s", cfg=cfg)
    resolve_alert("role_down:host1:web", cfg=cfg)

One active row per key: raising an active key again changes nothing and
notifies no one. With `cfg`, a new alert and its recovery are also sent to
`alerts.webhook_url` (JSON POST, 5 s timeout) and `alerts.command` (run by
/bin/sh with the alert in CAMPAIGND_ALERT_* variables), from threads, so the
caller never waits on a slow receiver. The JSON body carries a "text" field,
which is what Slack/Mattermost incoming webhooks display.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict
from dataclasses import dataclass

from daemon.config import AlertsConfig
from daemon.config import Config
from daemon.store.db import db_session as _db_session
from daemon.store.models import Alert
from daemon.store.models import database
from daemon.store.models import utcnow

RAISED = "raised"
RESOLVED = "resolved"
WEBHOOK_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlertEvent:
    """One alert or recovery notice, as sent to the webhook and the command."""

    key: str
    status: str  # RAISED or RESOLVED
    severity: str
    message: str
    host: str
    at: str  # ISO 8601, UTC

    @classmethod
    def now(cls, key: str, status: str, message: str, severity: str = "critical"):
        at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return cls(key, status, severity, message, socket.gethostname(), at)

    def payload(self) -> dict:
        body = asdict(self)
        body["text"] = f"[campaignd@{self.host}] {self.status.upper()}: {self.message}"
        return body

    def env(self) -> dict[str, str]:
        return {
            "CAMPAIGND_ALERT_KEY": self.key,
            "CAMPAIGND_ALERT_STATUS": self.status,
            "CAMPAIGND_ALERT_SEVERITY": self.severity,
            "CAMPAIGND_ALERT_MESSAGE": self.message,
            "CAMPAIGND_ALERT_HOST": self.host,
            "CAMPAIGND_ALERT_AT": self.at,
            "CAMPAIGND_ALERT_JSON": json.dumps(self.payload()),
        }


# ------------------------------------------------------------------ database


def db_session():
    """The supervisor's session: idle pooled connections closed afterwards."""
    return _db_session(close_idle=True)


def record_raised(key: str, message: str, severity: str = "critical") -> bool:
    """Insert an active alert row unless one is active for `key`; True if new."""
    with db_session(), database.atomic():
        active = Alert.select().where(Alert.key == key, Alert.resolved_at.is_null())
        if active.exists():
            return False
        Alert.create(key=key, message=message, severity=severity)
    return True


def record_resolved(key: str) -> bool:
    """Mark the active alert for `key` resolved; True if there was one."""
    with db_session():
        updated = (
            Alert.update(resolved_at=utcnow())
            .where(Alert.key == key, Alert.resolved_at.is_null())
            .execute()
        )
    return updated > 0


def active_alerts(limit: int = 100) -> list[dict]:
    """Unresolved alerts, newest first."""
    with db_session():
        rows = (
            Alert.select()
            .where(Alert.resolved_at.is_null())
            .order_by(Alert.raised_at.desc())
            .limit(limit)
        )
        return [
            {
                "key": a.key,
                "severity": a.severity,
                "message": a.message,
                "raised_at": a.raised_at.isoformat(timespec="seconds") + "Z",
            }
            for a in rows
        ]


def active_keys(*prefixes: str) -> list[str]:
    """Keys of the unresolved alerts starting with any of `prefixes`."""
    with db_session():
        rows = Alert.select(Alert.key).where(Alert.resolved_at.is_null())
        return [a.key for a in rows if a.key.startswith(prefixes)]


# ------------------------------------------------------------- notifications


def post_webhook(url: str, event: AlertEvent, timeout: float = WEBHOOK_TIMEOUT_S):
    """POST the event as JSON; log (never raise) on failure. True if 2xx."""
    return _post_json(url, event.payload(), f"alert webhook for {event.key}", timeout)


def ping(url: str, body: dict, timeout: float = WEBHOOK_TIMEOUT_S) -> bool:
    """POST one dead man's switch ping; log (never raise) on failure."""
    return _post_json(url, body, "heartbeat ping", timeout)


def _post_json(url: str, body: dict, what: str, timeout: float) -> bool:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "campaignd"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # The URL may carry a token (Slack, healthchecks.io): its host only.
        host = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]
        log.warning("%s to %s failed: %s", what, host or "?", exc)
        return False


def command_argv(command: str) -> list[str]:
    return ["/bin/sh", "-c", command]


def run_command(command: str, event: AlertEvent, timeout=COMMAND_TIMEOUT_S):
    """Run the alert command with the event in its environment; its exit code."""
    try:
        done = subprocess.run(
            command_argv(command),
            env={**os.environ, **event.env()},
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("alert command failed for %s: %s", event.key, exc)
        return None
    if done.returncode:
        log.warning("alert command for %s exited %s", event.key, done.returncode)
    return done.returncode


def notify_now(alerts_cfg: AlertsConfig, event: AlertEvent) -> dict[str, bool]:
    """Send the event to every configured channel and wait: {channel: ok}.

    For a process about to exit (a config error) and for `campaignd alert`:
    nothing may be left to a daemon thread.
    """
    sent = {}
    if alerts_cfg.webhook_url:
        sent["webhook"] = post_webhook(alerts_cfg.webhook_url, event)
    if alerts_cfg.command:
        sent["command"] = run_command(alerts_cfg.command, event) == 0
    return sent


def notify_in_background(alerts_cfg: AlertsConfig, event: AlertEvent) -> None:
    """Send the event to the webhook and the command without waiting for them."""
    if alerts_cfg.webhook_url:
        _thread(post_webhook, alerts_cfg.webhook_url, event)
    if alerts_cfg.command:
        _thread(run_command, alerts_cfg.command, event)


def _thread(target, *args) -> None:
    threading.Thread(
        target=target, args=args, name="campaignd-alert", daemon=True
    ).start()


# ------------------------------------------------------------------ the API


def raise_alert(
    key: str, message: str, severity: str = "critical", cfg: Config | None = None
) -> bool:
    """Record and announce an alert once per key; True if it is new."""
    if not record_raised(key, message, severity):
        return False
    log.critical("ALERT %s: %s", key, message)
    if cfg is not None:
        notify_in_background(cfg.alerts, AlertEvent.now(key, RAISED, message, severity))
    return True


def resolve_alert(key: str, cfg: Config | None = None, message: str = "") -> bool:
    """Close the active alert for `key` and send the recovery notice; True if any."""
    if not record_resolved(key):
        return False
    message = message or f"{key} resolved"
    log.warning("RESOLVED %s: %s", key, message)
    if cfg is not None:
        notify_in_background(cfg.alerts, AlertEvent.now(key, RESOLVED, message))
    return True


# -------------------------------------------------------------- role alerts
