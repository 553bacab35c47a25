"""Pacing of Message 1: a rate per device, a daily cap, and a send window.

Shared by every worker thread, process and host, because the state lives in
the database: the next free send slot in a `lease` row, the day's count in a
`daily_counter` row. Each reservation is one short write transaction
(IMMEDIATE on SQLite, SELECT ... FOR UPDATE on PostgreSQL). With the limits
at 0 (unlimited), nothing is read or written.

Message 2 is not paced: it answers a person who just wrote to us.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import peewee as pw

from daemon.config import PacingConfig
from daemon.config import parse_hhmm
from daemon.store.db import drop_connection
from daemon.store.db import is_postgres
from daemon.store.models import DailyCounter
from daemon.store.models import Lease
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Send now after `wait_s`, or come back at `retry_at` (naive UTC)."""

    wait_s: float = 0.0
    retry_at: dt.datetime | None = None
    reason: str = ""
    # retry_at is a rate slot reserved for this message: when it comes back
    # then, it must not reserve another one.
    slot_reserved: bool = False

    @property
    def go(self) -> bool:
        return self.retry_at is None


class Pacer:
    def __init__(self, cfg: PacingConfig, device: str, max_wait_s: float = 5.0):
        self.cfg = cfg
        self.device = device or "default"
        # A thread may sleep this long for its slot; beyond it the message
        # goes back to the queue so threads stay free for Message 2.
        self.max_wait_s = max_wait_s
        # How late a row may come for the slot it reserved and still use it.
        self.slot_grace = dt.timedelta(seconds=max_wait_s)
        self._tz = ZoneInfo(cfg.timezone)
        self._start = parse_hhmm("pacing.window_start", cfg.window_start)
        self._end = parse_hhmm("pacing.window_end", cfg.window_end)

    @property
    def unlimited(self) -> bool:
        return (
            not self.cfg.per_minute
            and not self.cfg.daily_cap
            and self._start == self._end
        )

    def decide(self, now: dt.datetime, *, has_slot: bool = False) -> Decision:
        """Window, then the rate slot (the only one that waits), then the cap.

        Every message gets its own slot, at most once: one too far ahead goes
        back to the queue until its slot (`slot_reserved`), and comes back
        with `has_slot=True`. So a backlog of N messages costs N reservations,
        not N every few seconds. The cap comes last so that a message sent
        back for pacing has not used up a unit of the day's cap; a slot taken
        by a message that then hits the cap is lost, which only happens once
        the cap is reached.
        """
        opens = self.window_opens_at(now)
        if opens is not None:
            return Decision(retry_at=opens, reason="outside the send window")
        decision = Decision()
        if self.cfg.per_minute and not has_slot:
            decision = self._reserve_slot(now)
        if not decision.go:
            return decision
        if self.cfg.daily_cap and not self._take_daily(now):
            tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time())
            return Decision(retry_at=tomorrow, reason="daily cap reached")
        return decision

    def window_opens_at(self, now: dt.datetime) -> dt.datetime | None:
        """None when `now` (naive UTC) is inside the window, else the next opening."""
        if self._start == self._end:
            return None
        local = now.replace(tzinfo=dt.UTC).astimezone(self._tz)
        minutes = local.hour * 60 + local.minute
        start = self._start[0] * 60 + self._start[1]
        end = self._end[0] * 60 + self._end[1]
        inside = (
            start <= minutes < end if start < end else minutes >= start or minutes < end
        )
        if inside:
            return None
        opening = local.replace(
            hour=self._start[0] % 24, minute=self._start[1], second=0, microsecond=0
        )
        if opening <= local:
            opening += dt.timedelta(days=1)
        return opening.astimezone(dt.UTC).replace(tzinfo=None)

    def window_closes_at(self, now: dt.datetime) -> dt.datetime | None:
        """The end of the window `now` (naive UTC) is in; None when the
        window is always open."""
        if self._start == self._end:
            return None
        local = now.replace(tzinfo=dt.UTC).astimezone(self._tz)
        closing = local.replace(
            hour=self._end[0] % 24, minute=self._end[1], second=0, microsecond=0
        )
        if closing <= local:
            closing += dt.timedelta(days=1)
        return closing.astimezone(dt.UTC).replace(tzinfo=None)

    def give_back_daily(self, day: dt.date) -> None:
        """A unit of `day`'s cap back: the provider refused the message (a
        4xx answer, no connection), so nothing reached WhatsApp. A refusal
        that is retried takes its unit again when it goes. Tried once: a
        second give-back would free a unit that was used, so if the
        database fails the unit stays taken."""
        if not self.cfg.daily_cap:
            return
        try:
            DailyCounter.update(value=DailyCounter.value - 1).where(
                DailyCounter.day == day,
                DailyCounter.name == f"cap:{self.device}",
                DailyCounter.value > 0,
            ).execute()
        except (pw.OperationalError, pw.InterfaceError) as exc:
            drop_connection()
            log.warning("a unit of the daily cap not given back: %s", exc)

    def _take_daily(self, now: dt.datetime) -> bool:
        name = f"cap:{self.device}"
        day = now.date()
        with database.atomic():
            DailyCounter.insert(
                day=day, name=name, value=0
            ).on_conflict_ignore().execute()
            taken = (
                DailyCounter.update(value=DailyCounter.value + 1, updated_at=now)
                .where(
                    DailyCounter.day == day,
                    DailyCounter.name == name,
                    DailyCounter.value < self.cfg.daily_cap,
                )
                .execute()
            )
        return bool(taken)

    def _reserve_slot(self, now: dt.datetime) -> Decision:
        """The row `pacing:<device>` holds the next free slot (`value`) and
        the last slot handed to a send that waits for it in its thread
        (`owner`, prefixed with REWIND when a campaign was paused or
        cancelled since: see rewind_lines)."""
        name = f"pacing:{self.device}"
        interval = 60.0 / self.cfg.per_minute
        now_s = now.replace(tzinfo=dt.UTC).timestamp()
        with database.atomic():
            Lease.insert(name=name, value="0").on_conflict_ignore().execute()
            query = Lease.select().where(Lease.name == name)
            if is_postgres():
                query = query.for_update()
            row = query.get()
            line = float(row.value or 0)
            marks = row.owner or ""
            last = _float_or_none(marks.removeprefix(REWIND))
            if marks.startswith(REWIND):
                line = min(line, self._rewound(now, now_s, last))
            slot = max(line, now_s)
            spacing = interval + random.uniform(0, self.cfg.jitter_s)
            wait = slot - now_s
            short = wait <= self.max_wait_s
            owner = repr(slot) if short else ("" if last is None else repr(last))
            Lease.update(value=repr(slot + spacing), owner=owner).where(
                Lease.name == name
            ).execute()
        if not short:
            retry_at = dt.datetime.fromtimestamp(slot, dt.UTC).replace(tzinfo=None)
            return Decision(retry_at=retry_at, reason="pacing", slot_reserved=True)
        return Decision(wait_s=wait)

    def _rewound(self, now: dt.datetime, now_s: float, last: float | None) -> float:
        """The next free slot once the slots nobody holds any more are given
        up. It stays after: the last slot a queued row still holds (its
        `paced_until`, which is its next_attempt_at); the last one handed to
        a thread that waits for it (`last`; unknown, as on a row of an
        older version: `max_wait_s` from now, past any such slot); and now,
        when a row that came back at its slot may be sending."""
        gap = 60.0 / self.cfg.per_minute + self.cfg.jitter_s
        held = (
            Message.select(pw.fn.MAX(Message.next_attempt_at))
            .where(
                Message.status == MessageStatus.QUEUED,
                Message.next_attempt_at > now,
                Message.paced_until.is_null(False),
            )
            .scalar()
        )
        floor = now_s + self.max_wait_s if last is None else last + gap
        floor = max(floor, now_s + gap)
        if held is not None:
            floor = max(floor, _timestamp(held) + gap)
        return floor


# The mark on a device's pacing row that some of its reserved slots may be
# held by nobody any more (rewind_lines).
REWIND = "rewind "


def rewind_lines() -> int:
    """A campaign was paused or cancelled: the slots its queued rows had
    reserved (a backlog's, minutes or hours of them) are free. Each
    device's next reservation gives them up (Pacer._rewound) instead of
    making every other campaign wait for them (before 2026-12-07 a
    campaign started after another was cancelled sent nothing for as long
    as the cancelled backlog would have taken;
    tests/integration/test_audit_pacing.py). A reservation made and not yet
    recorded on its row while that happens may see a new slot given next
    to its own: one pair of sends closer than the rate, once."""
    return (
        Lease.update(owner=pw.Value(REWIND).concat(Lease.owner))
        .where(Lease.name.startswith("pacing:"), ~Lease.owner.startswith(REWIND))
        .execute()
    )


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _timestamp(value) -> float:
    """A naive UTC datetime (or SQLite's text of one) as epoch seconds."""
    if not isinstance(value, dt.datetime):
        value = dt.datetime.fromisoformat(str(value))
    return value.replace(tzinfo=dt.UTC).timestamp()


# ------------------------------------------------------------------- the ETA

# An ETA further than this is shown as "not within a year" (a cap of 1 a day
# and a million members): the estimate stops walking days.
ETA_HORIZON_DAYS = 366


def sent_today(device: str, now: dt.datetime) -> int:
    """Message 1 counted against today's daily cap (UTC day) for `device`."""
    name = f"cap:{device or 'default'}"  # the name Pacer counts under
    row = (
        DailyCounter.select(DailyCounter.value)
        .where(DailyCounter.day == now.date(), DailyCounter.name == name)
        .first()
    )
    return row.value if row else 0


def message1_eta(
    cfg: PacingConfig, remaining: int, now: dt.datetime, used_today: int = 0
) -> dt.datetime | None:
    """When the last of `remaining` Message 1 goes out at the pacing limits
    (naive UTC), counted from `now` with `used_today` of the cap gone.

    The limits are per device and shared by every campaign: this assumes the
    campaign has the device to itself, and that workers and the provider keep
    up (with no limit at all, it is `now`). None when it is further than
    ETA_HORIZON_DAYS. Walks the time in spans where the rate is constant: up
    to the end of the UTC day (the cap's day) or of the send window.
    """
    if remaining <= 0:
        return now
    pacer = Pacer(cfg, "eta")
    per_s = cfg.per_minute / 60.0 if cfg.per_minute else float("inf")
    horizon = now + dt.timedelta(days=ETA_HORIZON_DAYS)
    left, t, cap_day, used = float(remaining), now, now.date(), float(used_today)
    while t < horizon:
        opens = pacer.window_opens_at(t)
        if opens is not None:
            t = opens
            continue
        if t.date() != cap_day:
            cap_day, used = t.date(), 0.0
        day_end = dt.datetime.combine(t.date() + dt.timedelta(days=1), dt.time())
        closes = pacer.window_closes_at(t)
        span_end = min(day_end, closes) if closes is not None else day_end
        cap_left = cfg.daily_cap - used if cfg.daily_cap else float("inf")
        if cap_left <= 0:
            t = day_end
            continue
        fits = min(cap_left, (span_end - t).total_seconds() * per_s)
        if left <= fits:
            return t + dt.timedelta(seconds=left / per_s)
        left -= fits
        used += fits
        t = span_end
    return None
