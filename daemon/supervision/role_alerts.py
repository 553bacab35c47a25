"""Role and dependency alerts: when a child or a backend stays down.

The state machines only decide; the supervisor announces (logs, records the
alert row, posts the webhook) through `daemon.domain.alerts`.
"""

from __future__ import annotations

from daemon.domain.alerts import RAISED
from daemon.domain.alerts import RESOLVED
from daemon.supervision.states import ChildState


class RoleAlerts:
    """The supervisor's alert policy for its roles (pure: no I/O, time given).

    A role not RUNNING for `down_after_s` raises ``role_down:HOST:ROLE``; a
    FATAL role raises ``role_fatal:HOST:ROLE`` at once; both are resolved when
    the role is RUNNING again. More than `restarts_per_hour` unplanned exits
    of a role within an hour raise ``role_flapping:HOST:ROLE`` (a role that
    dies every few minutes is never down long, never FATAL); resolved once
    the last hour holds half as many.
    """

    RATE_WINDOW_S = 3600.0

    def __init__(self, host: str, down_after_s: float, restarts_per_hour: int = 10):
        self.host = host
        self.down_after_s = down_after_s
        self.restarts_per_hour = restarts_per_hour
        self.raised: set[str] = set()

    def down_key(self, name: str) -> str:
        return f"role_down:{self.host}:{name}"

    def fatal_key(self, name: str) -> str:
        return f"role_fatal:{self.host}:{name}"

    def flapping_key(self, name: str) -> str:
        return f"role_flapping:{self.host}:{name}"

    def prefixes(self) -> tuple[str, str, str]:
        return (
            f"role_down:{self.host}:",
            f"role_fatal:{self.host}:",
            f"role_flapping:{self.host}:",
        )

    def check(self, children, now: float) -> list[tuple[str, str, str]]:
        """(key, RAISED|RESOLVED, message) for every change since last time."""
        out = []
        for child in children:
            out += self._rate(child, now)
            down_key, fatal_key = self.down_key(child.name), self.fatal_key(child.name)
            if child.state is ChildState.RUNNING:
                for key in (down_key, fatal_key):
                    if key in self.raised:
                        self.raised.discard(key)
                        message = f"{child.name} is running again (pid {child.pid})"
                        out.append((key, RESOLVED, message))
                continue
            if child.state is ChildState.FATAL and fatal_key not in self.raised:
                self.raised.add(fatal_key)
                out.append(
                    (
                        fatal_key,
                        RAISED,
                        f"{child.name} is FATAL after {len(child.exits)} exits "
                        f"(last: {child.last_exit}); next try in "
                        f"{max(0.0, child.retry_at - now):.0f}s",
                    )
                )
            down_for = now - (child.down_since if child.down_since is not None else now)
            if down_for >= self.down_after_s and down_key not in self.raised:
                self.raised.add(down_key)
                out.append(
                    (
                        down_key,
                        RAISED,
                        f"{child.name} not running for {down_for:.0f}s "
                        f"({child.state.name}, last exit: "
                        f"{child.last_exit or 'none'})",
                    )
                )
        return out

    def _rate(self, child, now: float) -> list[tuple[str, str, str]]:
        key = self.flapping_key(child.name)
        recent = sum(1 for t in child.unplanned_exits if t >= now - self.RATE_WINDOW_S)
        if recent > self.restarts_per_hour and key not in self.raised:
            self.raised.add(key)
            message = (
                f"{child.name} exited unexpectedly {recent} times in the last hour "
                f"(last: {child.last_exit or 'none'})"
            )
            return [(key, RAISED, message)]
        if key in self.raised and recent <= self.restarts_per_hour // 2:
            self.raised.discard(key)
            message = f"{child.name}: {recent} unexpected exits in the last hour"
            return [(key, RESOLVED, message)]
        return []

    def next_deadline(self, children) -> float | None:
        """When a down role will cross the threshold (monotonic), if any."""
        return min(
            (
                c.down_since + self.down_after_s
                for c in children
                if c.down_since is not None and self.down_key(c.name) not in self.raised
            ),
            default=None,
        )


class DependencyAlerts:
    """Raise when the database or the queue backend stays unreachable for
    `down_after_s`; resolve when it answers again."""

    CHECKS = (
        ("dependency:database", "database", "db_error"),
        ("dependency:queue", "queue backend", "queues_error"),
    )

    def __init__(self, down_after_s: float):
        self.down_after_s = down_after_s
        self.down_since: dict[str, float] = {}
        self.alerted: set[str] = set()

    def check(self, figures: dict, now: float) -> list[tuple[str, str, str]]:
        """(key, RAISED|RESOLVED, message) for every change since last time."""
        out = []
        for key, what, field in self.CHECKS:
            error = figures.get(field)
            if error:
                since = self.down_since.setdefault(key, now)
                down_for = now - since
                if key not in self.alerted and down_for >= self.down_after_s:
                    self.alerted.add(key)
                    message = f"{what} unreachable for {down_for:.0f}s: {error}"
                    out.append((key, RAISED, message))
            else:
                self.down_since.pop(key, None)
                if key in self.alerted:
                    self.alerted.discard(key)
                    out.append((key, RESOLVED, f"{what} reachable again"))
        return out
