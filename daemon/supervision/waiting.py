"""Before the roles: wait for the database instead of exiting.

An unreachable database at start used to make `campaignd run` exit 1, and
systemd restarted it every 2 s, forever and silently. Now the supervisor
stays up: it retries with backoff (1 s doubling to 30 s), answers
`campaignd status` ("waiting for the database" and the error, exit 1),
tells systemd (READY=1 so the start does not time out, STATUS= with the
error, WATCHDOG=1 while it waits), alerts through the configured channels
after `alerts.down_after_s` (the alert table is in the database that is
down, so the notice goes to the webhook and command only), and starts the
roles once the database answers, sending the recovery notice if it alerted.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time

from daemon import __version__
from daemon.domain import alerts
from daemon.errors import ConfigError
from daemon.supervision.status import StatusServer
from daemon.supervision.systemd import Notifier

log = logging.getLogger("daemon.supervision.supervisor")

ALERT_KEY = "dependency:database"
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0


def open_and_migrate(cfg, on_start=None):
    """Open the database and migrate its schema, then `on_start(cfg)`: the
    start's release of the leases a previous run's dead workers left, which
    would otherwise hold their rows until they expire."""
    from daemon.store.db import open_database

    db = open_database(cfg, migrate_schema=True)
    if on_start is not None:
        on_start(cfg)
    return db


def close_database(db) -> None:
    """Close it before the children are spawned, so nothing is held then;
    pooled PostgreSQL keeps idle connections: they are dropped too."""
    from daemon.store.db import close_database as close

    close(db)


def wait_for_database(cfg, connect):
    """`connect()` (open and migrate) until it works; its result, or None if
    the daemon was told to stop meanwhile. ConfigError is not retried."""
    try:
        return connect()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any DB failure: wait, do not exit
        error = f"{type(exc).__name__}: {exc}".strip()
    return _Waiting(cfg, connect, error).run()


class _Waiting:
    def __init__(self, cfg, connect, error: str):
        self.cfg = cfg
        self.connect = connect
        self.error = error
        self.started = time.monotonic()
        self.delay = FIRST_RETRY_S
        self.alerted = False
        self.stop = False
        self.systemd = Notifier()
        self.selector = selectors.DefaultSelector()
        self.status = StatusServer(cfg.status_socket, cfg.status.group, self.answer)
        self.status.register(self.selector)
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, self._drain)

    def run(self):
        log.error("cannot open or migrate the database: %s (retrying)", self.error)
        previous = {
            sig: signal.signal(sig, self._on_stop)
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        old_fd = signal.set_wakeup_fd(self.wakeup_w.fileno())
        try:
            self.systemd.notify("READY=1", self._status_line())
            next_try = time.monotonic() + self.delay
            while not self.stop:
                now = time.monotonic()
                if now >= next_try:
                    db = self._try()
                    if db is not None:
                        return db
                    self.delay = min(self.delay * 2, MAX_RETRY_S)
                    next_try = time.monotonic() + self.delay
                self._maybe_alert(now)
                if self.systemd.watchdog_interval_s:
                    self.systemd.notify("WATCHDOG=1")
                timeout = next_try - time.monotonic()
                if self.systemd.watchdog_interval_s:
                    timeout = min(timeout, self.systemd.watchdog_interval_s)
                for key, mask in self.selector.select(max(0.0, timeout)):
                    key.data(mask)
                self.status.expire(time.monotonic())
            log.info("stopped while waiting for the database")
            return None
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.status.close()
            self.selector.close()
            self.wakeup_r.close()
            self.wakeup_w.close()

    def _try(self):
        try:
            db = self.connect()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - still down
            error = f"{type(exc).__name__}: {exc}".strip()
            if error != self.error:
                log.error("database still unreachable: %s", error)
            self.error = error
            self.systemd.notify(self._status_line())
            return None
        down_for = time.monotonic() - self.started
        log.warning(
            "database reachable again after %.0fs: starting the roles", down_for
        )
        if self.alerted:
            self._notify(
                alerts.RESOLVED, f"database reachable again after {down_for:.0f}s"
            )
        return db

    def _maybe_alert(self, now: float) -> None:
        down_for = now - self.started
        if self.alerted or down_for < self.cfg.alerts.down_after_s:
            return
        self.alerted = True
        message = (
            f"campaignd cannot start its roles: database unreachable for "
            f"{down_for:.0f}s ({self.error})"
        )
        log.critical("ALERT %s: %s", ALERT_KEY, message)
        self._notify(alerts.RAISED, message)

    def _notify(self, status: str, message: str) -> None:
        if self.cfg.alerts.webhook_url or self.cfg.alerts.command:
            event = alerts.AlertEvent.now(ALERT_KEY, status, message)
            alerts.notify_now(self.cfg.alerts, event)

    def answer(self, request: dict, conn) -> None:
        if request.get("cmd") != "status":
            self.status.respond(conn, {"error": "waiting for the database"})
            return
        down_for = time.monotonic() - self.started
        self.status.respond(
            conn,
            {
                "daemon": {
                    "state": "waiting for the database",
                    "pid": os.getpid(),
                    "version": __version__,
                    "host": socket.gethostname(),
                    "uptime_s": round(down_for, 1),
                },
                "roles": [],
                "db_error": self.error,
                "alerts": [{"key": ALERT_KEY, "message": self.error}]
                if self.alerted
                else [],
            },
        )

    def _status_line(self) -> str:
        return f"STATUS=waiting for the database: {self.error}"[:400]

    def _on_stop(self, signum, frame) -> None:
        self.stop = True

    def _drain(self, _mask: int) -> None:
        try:
            while self.wakeup_r.recv(64):
                pass
        except BlockingIOError:
            pass
