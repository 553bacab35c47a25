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

# Variables a child must not inherit: only the supervisor talks to systemd.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

log = logging.getLogger(__name__)


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
