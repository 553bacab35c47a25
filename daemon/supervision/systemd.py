"""sd_notify without libsystemd: one datagram per message to $NOTIFY_SOCKET.

The protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` lines sent as one
datagram to the AF_UNIX socket named in $NOTIFY_SOCKET; a leading ``@`` means
the Linux abstract namespace. $WATCHDOG_USEC (meant for us when $WATCHDOG_PID
is unset or our pid) asks for ``WATCHDOG=1`` at least that often; we ping at
half of it, as sd_watchdog_enabled(3) advises.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from daemon.supervision.states import ChildState

# Variables a child must not inherit: only the supervisor talks to systemd.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

log = logging.getLogger(__name__)
# The supervisor's own lines, under its name.
supervisor_log = logging.getLogger("daemon.supervision.supervisor")


class Notifier:
    """Talks to systemd when started by it; silently does nothing otherwise."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog_interval_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send the lines as one message; False if there is no one listening."""
        if not self.address:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the supervisor's loop on a full systemd queue:
                # a lost STATUS= is harmless, the next WATCHDOG=1 comes soon.
                sock.setblocking(False)
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", lines[0] if lines else "", exc)
            return False
        return True

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd tell this reload from an older one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def _watchdog_interval(env) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


class SystemdReporting:
    """The supervisor's side of sd_notify: READY, STATUS, WATCHDOG.

    A mixin of `Supervisor` (daemon/supervision/supervisor.py).
    """

    def status_line(self) -> str:
        running = sum(c.state is ChildState.RUNNING for c in self.children)
        line = f"{running}/{len(self.children)} roles running"
        bad = [
            f"{c.name} {c.state.name}"
            for c in self.children
            if c.state is not ChildState.RUNNING
        ]
        if bad:
            line += "; " + ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
        if self.stopping_since is not None:
            line = "stopping; " + line
        elif self.reloading:
            line = "reloading; " + line
        return line

    def notify_systemd(self, now: float) -> None:
        """READY=1 once all run; WATCHDOG=1 while all beat; STATUS= on change."""
        if not self.systemd.enabled:
            return
        line = self.status_line()
        all_running = all(c.state is ChildState.RUNNING for c in self.children)
        if not self.ready_sent and all_running and self.stopping_since is None:
            self.ready_sent = True
            supervisor_log.info("every role is running: READY")
            self.systemd.notify("READY=1", f"STATUS={line}")
            self._last_status_line = line
        elif line != self._last_status_line:
            self._last_status_line = line
            self.systemd.notify(f"STATUS={line}")
        interval = self.systemd.watchdog_interval_s
        if interval and now >= self._next_watchdog:
            if self.watchdog_ok(now):
                self.systemd.notify("WATCHDOG=1")
                self._next_watchdog = now + interval
            else:
                self._next_watchdog = now + min(interval, 0.1)

    def watchdog_ok(self, now: float) -> bool:
        """Every live child beat recently (a wedged tree stops the pings)."""
        sup = self.cfg.supervisor
        fresh = min(sup.heartbeat_timeout_s / 2, max(3 * sup.heartbeat_interval_s, 2.0))
        return all(c.heartbeat_fresh(now, fresh) for c in self.children)
