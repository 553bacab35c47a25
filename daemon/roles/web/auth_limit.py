"""Wrong `web.api_token` guesses, counted per client address.

The admin API and the console's login take the same token. Past
FAILURES_ALLOWED wrong tokens from one address within WINDOW_S, that address
is answered 429 with Retry-After, its token not even compared (a right guess
in a burst of wrong ones is not confirmed), until its oldest counted failure
leaves the window. A right token clears the address's count.

The address is the socket's peer (falcon's remote_addr), never a header a
client can write: behind a reverse proxy every client shares the proxy's
count, so a flood of wrong tokens there also keeps the operator out until
the window passes. The counts live in the web process (each process and host
counts alone) and are forgotten on restart; they bound guessing, they are
not an account lockout.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

FAILURES_ALLOWED = 10
WINDOW_S = 60.0
# The most addresses remembered; past it, the stalest are forgotten first.
MAX_ADDRESSES = 10_000


class FailedAuth:
    """Thread-safe: waitress's request threads share one."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        allowed: int = FAILURES_ALLOWED,
        window_s: float = WINDOW_S,
    ) -> None:
        self._clock = clock
        self._allowed = allowed
        self._window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try a token again; 0 when it may now."""
        with self._lock:
            times = self._recent(address, self._clock())
            if times is None or len(times) < self._allowed:
                return 0
            return max(1, math.ceil(times[0] + self._window_s - self._clock()))

    def failed(self, address: str, where: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._recent(address, now)
            if times is None:
                if len(self._failures) >= MAX_ADDRESSES:
                    self._forget_stalest(now)
                times = self._failures[address] = deque(maxlen=self._allowed)
            times.append(now)
            full = len(times) == self._allowed
        if full:
            log.warning(
                "%s: %d wrong tokens from %s within %.0f s: its next attempts are"
                " answered 429 until the window passes",
                where,
                self._allowed,
                address,
                self._window_s,
            )
        else:
            log.warning("%s: wrong token from %s", where, address)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self._window_s:
            times.popleft()
        return times

    def _forget_stalest(self, now: float) -> None:
        stale = [
            a
            for a, t in self._failures.items()
            if not t or t[-1] <= now - self._window_s
        ]
        for address in stale:
            del self._failures[address]
        while len(self._failures) >= MAX_ADDRESSES:
            # Insertion order: the address that failed first among those left.
            del self._failures[next(iter(self._failures))]
