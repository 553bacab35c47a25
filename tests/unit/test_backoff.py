"""Retry backoff: exponential from the base, capped, with bounded jitter."""

from __future__ import annotations

import random

import pytest

from daemon.config import RetryConfig
from daemon.domain.campaigns import Backoff


def test_delays_double_from_the_base():
    backoff = Backoff(base_s=60, factor=2, cap_s=3600, jitter=0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]


def test_first_failure_waits_the_base_even_when_counted_from_zero():
    backoff = Backoff(base_s=60, factor=2, cap_s=3600, jitter=0)
    assert backoff.delay(0) == backoff.delay(1) == 60


def test_delay_is_capped():
    backoff = Backoff(base_s=60, factor=2, cap_s=300, jitter=0)
    assert [backoff.delay(n) for n in (3, 4, 10, 60)] == [240, 300, 300, 300]


def test_factor_one_is_a_constant_delay():
    backoff = Backoff(base_s=5, factor=1, cap_s=3600, jitter=0)
    assert {backoff.delay(n) for n in range(1, 20)} == {5}


@pytest.mark.parametrize("failures", [1, 3, 8])
def test_jitter_adds_at_most_its_share_and_spreads_retries(failures):
    backoff = Backoff(base_s=60, factor=2, cap_s=3600, jitter=0.1)
    raw = min(3600, 60 * 2 ** (failures - 1))
    rng = random.Random(7)
    delays = [backoff.delay(failures, rng) for _ in range(500)]
    assert all(raw <= d <= raw * 1.1 for d in delays)
    # Spread over the whole band, so retries of one burst do not stampede.
    assert min(delays) < raw * 1.01 and max(delays) > raw * 1.09
    assert len(set(delays)) > 450


def test_jitter_applies_on_top_of_the_cap():
    backoff = Backoff(base_s=60, factor=2, cap_s=100, jitter=0.5)
    delays = [backoff.delay(10, random.Random(seed)) for seed in range(200)]
    assert all(100 <= d <= 150 for d in delays)


def test_defaults_are_the_original_systems_60_120_240():
    cfg = RetryConfig()
    backoff = Backoff(cfg.base_s, cfg.factor, cfg.cap_s, jitter=0)
    assert [backoff.delay(n) for n in (1, 2, 3)] == [60, 120, 240]
    assert 0 < cfg.jitter <= 0.25
