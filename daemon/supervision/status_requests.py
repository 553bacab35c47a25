"""The supervisor's answers on the status socket: status, restart, reload.

A mixin of `Supervisor` (daemon/supervision/supervisor.py). The socket
itself and the figures (queue depths, counters) are in status.py.
"""

from __future__ import annotations

import logging
import os
import time

from daemon import __version__
from daemon.supervision.states import ChildState

log = logging.getLogger("daemon.supervision.supervisor")  # one name for its whole log

# Status figures (queue depths, counters) younger than this are served as
# they are; older ones are refreshed off-loop while the request waits <= 1 s.
FIGURES_MAX_AGE_S = 2.0
FIGURES_WAIT_S = 1.0


class StatusRequests:
    """What a `campaignd status | restart | reload` client is answered."""

    def on_status_request(self, request: dict, conn) -> None:
        cmd = request["cmd"]
        respond = self.status_server.respond
        if cmd == "status":
            now = time.monotonic()
            fresh = now - self._figures_at <= FIGURES_MAX_AGE_S
            # "figures": false asks for the roles only, answered at once.
            if request.get("figures") is False or (self._figures is not None and fresh):
                respond(conn, self.status_answer(now))
                return
            self.refresh_figures()
            self._parked.append((conn, now + FIGURES_WAIT_S))
        elif cmd == "restart":
            role = request.get("role")
            names = self.restart_role(role) if isinstance(role, str) else []
            if not names:
                roles = ", ".join(c.name for c in self.children)
                respond(conn, {"error": f"unknown role {role!r} (roles: {roles})"})
            elif self.stopping_since is not None:
                respond(conn, {"error": "the daemon is stopping"})
            else:
                respond(conn, {"ok": True, "restarting": names})
        elif cmd == "reload":
            self.handle_hup()
            respond(conn, {"ok": True, "reloading": self.reloading})
        else:
            respond(conn, {"error": f"unknown cmd {cmd!r} (status, restart, reload)"})

    def refresh_figures(self) -> None:
        if self._figures_job is not None and not self._figures_job.done():
            return
        self._figures_job = self._submit(
            self._figures_pool, self._gatherer.gather, on_done=self._got_figures
        )

    def _got_figures(self, figures) -> None:
        self._figures = figures or {}
        self._figures_at = time.monotonic()
        now = time.monotonic()
        for conn, _ in self._parked:
            self.status_server.respond(conn, self.status_answer(now))
        self._parked.clear()

    def serve_status(self, now: float) -> None:
        """Answer parked requests whose wait is over; drop idle clients."""
        due = [p for p in self._parked if p[1] <= now]
        for item in due:
            self._parked.remove(item)
            self.status_server.respond(item[0], self.status_answer(now))
        self.status_server.expire(now)

    def status_answer(self, now: float) -> dict:
        figures = self._figures or {}
        if self.stopping_since is not None:
            state = "stopping"
        elif self.reloading:
            state = "reloading"
        elif all(c.state is ChildState.RUNNING for c in self.children):
            state = "running"
        else:
            state = "degraded" if self.ready_sent else "starting"
        return {
            "daemon": {
                "pid": os.getpid(),
                "host": self.host,
                "version": __version__,
                "state": state,
                "uptime_s": round(now - self.started_at, 1),
                "config": self.cfg.source,
                "leader": figures.get("leader"),
            },
            "roles": [c.status(now) for c in self.children],
            "zygote": self.zygote.status(now) if self.zygote_factory else None,
            "queues": figures.get("queues"),
            "queues_error": figures.get("queues_error")
            or (None if self._figures is not None else "still gathering"),
            "campaigns": figures.get("campaigns"),
            "messages": figures.get("messages"),
            "last_health_check": figures.get("last_health_check"),
            "alerts": figures.get("alerts", []),
            "db_error": figures.get("db_error"),
            "data_age_s": round(now - self._figures_at, 1)
            if self._figures is not None
            else None,
        }
