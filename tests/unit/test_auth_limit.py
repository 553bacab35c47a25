"""Wrong api_token guesses per address (daemon/roles/web/auth_limit.py)."""

from __future__ import annotations

from daemon.roles.web import auth_limit
from daemon.roles.web.auth_limit import FailedAuth


def test_an_address_waits_until_its_oldest_failure_leaves_the_window():
    now = [1000.0]
    failures = FailedAuth(clock=lambda: now[0], allowed=3, window_s=60.0)
    for step in range(3):
        assert failures.retry_after("10.0.0.1") == 0
        failures.failed("10.0.0.1", "test")
        now[0] += 10.0 * (step < 2)
    # Failures at 1000, 1010, 1020; now 1020: the first leaves at 1060.
    assert failures.retry_after("10.0.0.1") == 40
    assert failures.retry_after("10.0.0.2") == 0
    now[0] = 1059.5
    assert failures.retry_after("10.0.0.1") == 1
    now[0] = 1060.0
    assert failures.retry_after("10.0.0.1") == 0
    # One more wrong token fills the window again (1010, 1020, 1060).
    failures.failed("10.0.0.1", "test")
    assert failures.retry_after("10.0.0.1") == 10


def test_a_right_token_clears_the_count():
    failures = FailedAuth(allowed=2)
    failures.failed("10.0.0.1", "test")
    failures.succeeded("10.0.0.1")
    failures.failed("10.0.0.1", "test")
    assert failures.retry_after("10.0.0.1") == 0


def test_memory_is_bounded_by_forgetting_the_stalest_addresses(monkeypatch):
    monkeypatch.setattr(auth_limit, "MAX_ADDRESSES", 3)
    now = [0.0]
    failures = FailedAuth(clock=lambda: now[0], allowed=1, window_s=60.0)
    for n in range(3):
        failures.failed(f"10.0.0.{n}", "test")
        now[0] += 1
    failures.failed("10.0.0.9", "test")
    # The first address to fail is forgotten; the newer ones still wait.
    assert failures.retry_after("10.0.0.0") == 0
    assert [failures.retry_after(f"10.0.0.{n}") > 0 for n in (1, 2, 9)] == [True] * 3
