"""pacing.message1_eta: when the last Message 1 goes out at the pacing limits.

`campaignd campaign show --watch` prints it; time is passed in, nothing
sleeps. The cap's count comes from the real `daily_counter` row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from daemon.config import PacingConfig
from daemon.domain.pacing import Pacer
from daemon.domain.pacing import message1_eta
from daemon.domain.pacing import sent_today
from tests.send_helpers import close_db
from tests.send_helpers import open_db

pytestmark = pytest.mark.timeout(30)

T0 = dt.datetime(2031, 1, 20, 10, 0, 0)  # winter: Paris is UTC+1
UNLIMITED = PacingConfig(per_minute=0, daily_cap=0)


def pacing(**changes) -> PacingConfig:
    return dataclasses.replace(UNLIMITED, **changes)


def test_no_limit_means_now_and_nothing_left_means_now():
    assert message1_eta(UNLIMITED, 1_000_000, T0) == T0
    assert message1_eta(pacing(per_minute=12.0), 0, T0) == T0


def test_the_rate_alone():
    # 60 at 12 a minute: five minutes.
    assert message1_eta(pacing(per_minute=12.0), 60, T0) == T0 + dt.timedelta(minutes=5)


def test_the_daily_cap_moves_the_rest_to_the_next_utc_days():
    cfg = pacing(daily_cap=100)
    # 10 left of today's cap; 120 more: 100 tomorrow, 20 the day after.
    eta = message1_eta(cfg, 130, T0, used_today=90)
    assert eta == dt.datetime(2031, 1, 22)
    assert message1_eta(cfg, 10, T0, used_today=90) == T0


def test_the_send_window_in_its_time_zone():
    cfg = pacing(
        per_minute=1.0,
        window_start="09:00",
        window_end="10:00",
        timezone="Europe/Paris",
    )
    # 10:00 UTC is 11:00 in Paris: closed until 08:00 UTC tomorrow; 60 a
    # window, so 90 fill tomorrow's and half the next one.
    eta = message1_eta(cfg, 90, T0)
    assert eta == dt.datetime(2031, 1, 22, 8, 30)
    # Inside the window (09:30 Paris): 30 minutes today, then tomorrow.
    inside = dt.datetime(2031, 1, 20, 8, 30)
    assert message1_eta(cfg, 30, inside) == dt.datetime(2031, 1, 20, 9, 0)
    assert message1_eta(cfg, 31, inside) == dt.datetime(2031, 1, 21, 8, 1)


def test_a_window_across_midnight():
    cfg = pacing(per_minute=60.0, window_start="22:00", window_end="02:00")
    at = dt.datetime(2031, 1, 20, 23, 0)
    # 60 a minute: 4 hours hold 14400; 60 minutes fit before midnight.
    assert message1_eta(cfg, 3600, at) == dt.datetime(2031, 1, 21, 0, 0)
    assert message1_eta(cfg, 3660, at) == dt.datetime(2031, 1, 21, 0, 1)


def test_beyond_a_year_there_is_no_eta():
    assert message1_eta(pacing(daily_cap=1), 1000, T0) is None


def test_sent_today_reads_the_cap_counter(make_config):
    db = open_db(make_config("sqlite"))
    try:
        cfg = pacing(daily_cap=5)
        pacer = Pacer(cfg, "phone-1")
        assert sent_today("phone-1", T0) == 0
        for _ in range(3):
            assert pacer.decide(T0).go
        assert sent_today("phone-1", T0) == 3
        assert sent_today("phone-2", T0) == 0
        assert sent_today("phone-1", T0 + dt.timedelta(days=1)) == 0
    finally:
        close_db(db)
