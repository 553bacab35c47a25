"""Pacing of Message 1: rate per minute, daily cap, send window.

The state is in the database, so several Pacer objects (standing for worker
threads, processes or hosts) sharing one database must share one rate and
one cap. Time is always passed in: nothing here sleeps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

import pytest

from daemon.config import PacingConfig
from daemon.domain.pacing import Pacer
from daemon.store.models import DailyCounter
from daemon.store.models import Lease
from daemon.store.models import database
from tests.send_helpers import close_db
from tests.send_helpers import mode_config
from tests.send_helpers import open_db

T0 = dt.datetime(2031, 5, 20, 10, 0, 0)
UNLIMITED = PacingConfig(per_minute=0, daily_cap=0)


@pytest.fixture
def db(make_config):
    db = open_db(make_config("sqlite"))
    yield db
    close_db(db)


def pacing(**changes) -> PacingConfig:
    return dataclasses.replace(UNLIMITED, **changes)


def send_times(pacers, count: int, start: dt.datetime, step_s: float):
    """Ask the pacers in turn; a caller arrives every `step_s`, sends after its wait."""
    times, now = [], start
    for i in range(count):
        decision = pacers[i % len(pacers)].decide(now)
        assert decision.go, decision
        times.append(now + dt.timedelta(seconds=decision.wait_s))
        now += dt.timedelta(seconds=step_s)
    return times


def gaps(times) -> list[float]:
    pairs = zip(times, times[1:], strict=False)
    return [round((b - a).total_seconds(), 6) for a, b in pairs]


# ---------------------------------------------------------------- rate


def test_sends_are_spaced_60_over_rate_across_pacers(db):
    cfg = pacing(per_minute=12)
    pacers = [Pacer(cfg, "dev", max_wait_s=3600) for _ in range(4)]
    # Callers arrive faster (every second) than the rate allows (every 5 s).
    times = send_times(pacers, 25, T0, step_s=1.0)
    assert gaps(times) == [5.0] * 24
    assert times[0] == T0
    for start in times:
        in_minute = [t for t in times if start <= t < start + dt.timedelta(minutes=1)]
        assert len(in_minute) <= 12


def test_slow_arrivals_are_not_delayed(db):
    pacers = [Pacer(pacing(per_minute=12), "dev", max_wait_s=3600) for _ in range(2)]
    times = send_times(pacers, 6, T0, step_s=9.0)
    assert gaps(times) == [9.0] * 5


def test_no_burst_after_an_idle_period(db):
    pacer = Pacer(pacing(per_minute=12), "dev", max_wait_s=3600)
    send_times([pacer], 3, T0, step_s=0)
    later = T0 + dt.timedelta(hours=1)
    assert [pacer.decide(later).wait_s for _ in range(3)] == [0.0, 5.0, 10.0]


def test_a_slot_beyond_the_wait_limit_sends_the_message_back(db):
    pacer = Pacer(pacing(per_minute=12), "dev", max_wait_s=5)
    first, second, third = (pacer.decide(T0) for _ in range(3))
    assert (first.wait_s, second.wait_s) == (0.0, 5.0)
    assert not third.go
    assert third.retry_at == T0 + dt.timedelta(seconds=10)
    assert third.reason == "pacing"


def test_devices_are_paced_separately(db):
    cfg = pacing(per_minute=12)
    a, b = Pacer(cfg, "a", max_wait_s=3600), Pacer(cfg, "b", max_wait_s=3600)
    assert [a.decide(T0).wait_s, b.decide(T0).wait_s] == [0.0, 0.0]
    assert [a.decide(T0).wait_s, b.decide(T0).wait_s] == [5.0, 5.0]


def test_jitter_only_widens_the_spacing(db):
    pacer = Pacer(pacing(per_minute=12, jitter_s=2.0), "dev", max_wait_s=3600)
    times = send_times([pacer], 40, T0, step_s=0)
    assert all(5.0 <= g <= 7.0 for g in gaps(times))
    assert len(set(gaps(times))) > 30


@pytest.mark.parametrize("mode", ["sqlite", "pgqueue"])
@pytest.mark.timeout(60)
def test_concurrent_callers_never_share_a_slot(request, make_config, mode):
    db = open_db(mode_config(request, make_config, mode))
    try:
        cfg = pacing(per_minute=60)
        waits: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(6)

        def caller() -> None:
            pacer = Pacer(cfg, "dev", max_wait_s=3600)
            barrier.wait()
            try:
                for _ in range(5):
                    wait = pacer.decide(T0).wait_s
                    with lock:
                        waits.append(wait)
            finally:
                database.close()

        threads = [threading.Thread(target=caller) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(waits) == [float(s) for s in range(30)]
    finally:
        close_db(db)


# ---------------------------------------------------------------- daily cap


def test_daily_cap_stops_at_n_across_pacers_until_utc_midnight(db):
    cfg = pacing(daily_cap=3)
    pacers = [Pacer(cfg, "dev") for _ in range(3)]
    late = dt.datetime(2031, 5, 20, 23, 59, 59)
    decisions = [pacers[i % 3].decide(late) for i in range(5)]
    assert [d.go for d in decisions] == [True, True, True, False, False]
    midnight = dt.datetime(2031, 5, 21)
    assert {d.retry_at for d in decisions[3:]} == {midnight}
    assert decisions[3].reason == "daily cap reached"
    assert pacers[0].decide(midnight).go
    counts = {(c.day, c.value) for c in DailyCounter.select()}
    assert counts == {(dt.date(2031, 5, 20), 3), (dt.date(2031, 5, 21), 1)}


def test_daily_cap_is_per_device(db):
    cfg = pacing(daily_cap=1)
    assert Pacer(cfg, "a").decide(T0).go
    assert Pacer(cfg, "b").decide(T0).go
    assert not Pacer(cfg, "a").decide(T0).go


def test_messages_sent_back_for_pacing_do_not_use_the_daily_cap(db):
    pacer = Pacer(pacing(per_minute=12, daily_cap=3), "dev", max_wait_s=5)
    # A backlog of 8 messages at once: 2 fit in the wait limit, 6 go back
    # with their own slot reserved, 5 s apart.
    first = [pacer.decide(T0) for _ in range(8)]
    assert sum(d.go for d in first) == 2
    deferred = [d for d in first if not d.go]
    assert all(d.slot_reserved for d in deferred)
    assert [d.retry_at for d in deferred] == [
        T0 + dt.timedelta(seconds=5 * i) for i in range(2, 8)
    ]
    # Each comes back at its slot without reserving another; the cap lets
    # exactly one more through.
    later = [pacer.decide(d.retry_at, has_slot=True) for d in deferred]
    assert sum(d.go for d in later) == 1
    assert {d.reason for d in later if not d.go} == {"daily cap reached"}


def test_a_message_with_a_slot_does_not_reserve_another(db):
    pacer = Pacer(pacing(per_minute=12), "dev", max_wait_s=5)
    assert pacer.decide(T0).wait_s == 0.0
    assert pacer.decide(T0, has_slot=True).go
    # The next fresh message still gets the slot after the first one.
    assert pacer.decide(T0).wait_s == 5.0


# ---------------------------------------------------------------- window


def paris(start="09:00", end="18:00") -> Pacer:
    cfg = pacing(window_start=start, window_end=end, timezone="Europe/Paris")
    return Pacer(cfg, "dev")


@pytest.mark.parametrize(
    ("now", "opens"),
    [
        # 07:30 in Paris in winter (UTC+1): opens at 09:00 local = 08:00 UTC.
        (dt.datetime(2031, 1, 15, 6, 30), dt.datetime(2031, 1, 15, 8, 0)),
        # 20:00 in Paris in summer (UTC+2): opens tomorrow 07:00 UTC.
        (dt.datetime(2031, 7, 15, 18, 0), dt.datetime(2031, 7, 16, 7, 0)),
        # Exactly at closing time: closed.
        (dt.datetime(2031, 7, 15, 16, 0), dt.datetime(2031, 7, 16, 7, 0)),
        # The evening before the spring change (CET): opens at 09:00 CEST.
        (dt.datetime(2031, 3, 29, 20, 0), dt.datetime(2031, 3, 30, 7, 0)),
        # The evening before the autumn change (CEST): opens at 09:00 CET.
        (dt.datetime(2031, 10, 25, 19, 0), dt.datetime(2031, 10, 26, 8, 0)),
    ],
)
def test_outside_the_window_waits_for_the_local_opening(db, now, opens):
    decision = paris().decide(now)
    assert not decision.go
    assert decision.retry_at == opens
    assert decision.reason == "outside the send window"


@pytest.mark.parametrize(
    "now",
    [
        dt.datetime(2031, 1, 15, 8, 0),  # 09:00 Paris: opening minute
        dt.datetime(2031, 1, 15, 16, 59),  # 17:59 Paris
        dt.datetime(2031, 7, 15, 15, 59),  # 17:59 Paris, summer
    ],
)
def test_inside_the_window_sends(db, now):
    assert paris().decide(now).go


@pytest.mark.parametrize(
    ("now", "opens"),
    [
        (dt.datetime(2031, 1, 15, 21, 30), None),  # 22:30 Paris
        (dt.datetime(2031, 1, 16, 4, 59), None),  # 05:59 Paris, next day
        (dt.datetime(2031, 1, 15, 11, 0), dt.datetime(2031, 1, 15, 21, 0)),
    ],
)
def test_a_window_across_midnight(db, now, opens):
    assert paris("22:00", "06:00").window_opens_at(now) == opens


def test_the_window_is_checked_before_the_cap(db):
    cfg = pacing(daily_cap=1, window_start="09:00", window_end="18:00")
    pacer = Pacer(cfg, "dev")
    assert not pacer.decide(dt.datetime(2031, 1, 15, 7, 0)).go
    assert DailyCounter.select().count() == 0
    assert pacer.decide(dt.datetime(2031, 1, 15, 9, 0)).go


def test_unlimited_pacing_touches_nothing(db):
    pacer = Pacer(UNLIMITED, "dev")
    assert pacer.unlimited
    assert all(pacer.decide(T0).go for _ in range(100))
    assert Lease.select().count() == 0 and DailyCounter.select().count() == 0
