"""The supervisor's alerts: roles down or FATAL, and dependencies (the
database, the queue backend) unreachable, logged, recorded and sent.

A mixin of `Supervisor` (daemon/supervision/supervisor.py). The alert rows
and notices are the only domain code the supervisor uses.
"""

from __future__ import annotations

import logging
import time

from daemon.domain import alerts
from daemon.supervision.states import ChildState

log = logging.getLogger("daemon.supervision.supervisor")  # one name for its whole log

# How often the database and the queue backend are probed for alerts.
DEPENDENCY_CHECK_S = 10.0


class Alerting:
    """Role alerts, dependency alerts, and their delivery without waiting."""

    # Monotonic time of the next dead man's switch ping (alerts.heartbeat_url).
    next_ping_at = 0.0

    def check_alerts(self, now: float) -> None:
        """Alert on roles down too long or FATAL; send recoveries."""
        if self.stopping_since is not None:
            return
        for key, status, message in self.role_alerts.check(self.children, now):
            self.announce(key, status, message)
        self.check_dependencies(now)
        self.ping_heartbeat_url(now)

    def ping_heartbeat_url(self, now: float) -> None:
        """The dead man's switch: a ping while all is well, silence otherwise.

        Silence is the alert, raised by the service at the URL: it also
        covers what nothing here can report (the host died, the supervisor
        froze).
        """
        url = self.cfg.alerts.heartbeat_url
        if not url or now < self.next_ping_at:
            return
        self.next_ping_at = now + self.cfg.alerts.heartbeat_every_s
        figures = self._figures or {}
        healthy = (
            all(c.state is ChildState.RUNNING for c in self.children)
            and self._figures is not None
            and not figures.get("db_error")
            and not figures.get("queues_error")
        )
        if not healthy:
            log.warning("heartbeat ping withheld: not every role and service is up")
            return
        body = {
            "host": self.host,
            "status": "ok",
            "roles": len(self.children),
            "at": time.time(),
        }
        self._notify_pool.submit(alerts.ping, url, body)

    def next_ping(self) -> float | None:
        return self.next_ping_at if self.cfg.alerts.heartbeat_url else None

    def check_dependencies(self, now: float) -> None:
        """Alert when the database or the queue backend stays unreachable.

        The scheduler's health check cannot do it then: it runs as a task on
        the queue and records into the database. The figures gathered for the
        status socket say whether both answer; they are refreshed here too.
        """
        if now - self._figures_at >= DEPENDENCY_CHECK_S:
            self.refresh_figures()
        if self._figures is None:
            return
        for key, status, message in self.dependency_alerts.check(self._figures, now):
            self.announce(key, status, message)

    def announce(self, key: str, status: str, message: str) -> None:
        """Log, record and send one alert or recovery notice, without waiting."""
        if status == alerts.RAISED:
            log.critical("ALERT %s: %s", key, message)
            self._submit(self._db_pool, alerts.record_raised, key, message)
        else:
            log.warning("RESOLVED %s: %s", key, message)
            self._submit(self._db_pool, alerts.record_resolved, key)
        event = alerts.AlertEvent.now(key, status, message)
        if self.cfg.alerts.webhook_url:
            self._notify_pool.submit(
                alerts.post_webhook, self.cfg.alerts.webhook_url, event
            )
        if self.cfg.alerts.command:
            # Spawned from the loop (not a thread) so our waitpid(-1) reaps a
            # pid it knows, and nobody else's wait() loses its status.
            argv = alerts.command_argv(self.cfg.alerts.command)
            try:
                pid = self.ops.spawn(tuple(argv), event.env())
            except OSError as exc:
                log.warning("alert command failed to start: %s", exc)
                return
            deadline = time.monotonic() + alerts.COMMAND_TIMEOUT_S
            self._helpers[pid] = (f"alert command for {key} (pid {pid})", deadline)

    def _adopt_alerts(self, keys) -> None:
        # Alerts left active by a previous run on this host: resolve them
        # when their role runs again.
        self.role_alerts.raised.update(keys or ())
