"""Exactly once on Meta's Cloud API, whatever the provider does: the real
daemon (`campaignd run`, embedded) against the fake's Meta dialect, slower
than `provider.timeout_s` for a third of the sends (sent all the same, as
Meta does), statuses seconds late, replies before any status.

A send whose answer never came is `unconfirmed`: only Meta's status webhook
(its `biz_opaque_callback_data` is our reference) or the contact's reply may
settle it, never a second request. Verdicts read what the phones show.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from daemon import testing as ch
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import reply_plan
from daemon.store.models import Message
from daemon.store.models import database
from tests.meta_helpers import meta_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SEED = 5
REPLY_SHARE = 0.4


def open_rows(campaign_id: int) -> int:
    """Rows that could still lead to a request: none, and nothing more goes."""
    with database.connection_context():
        return (
            Message.select()
            .where(
                Message.campaign == campaign_id,
                Message.status.in_(("queued", "sending", "unconfirmed")),
            )
            .count()
        )


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="meta-eo-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_slow_answers_late_statuses_replies_first_still_once(work):
    options = FakeOptions(
        latency_ms=20.0,
        slow_share=0.35,
        slow_latency_ms=1800.0,
        ack_delays_ms=(20.0, 40.0, 60.0),
        status_delay_ms=2000.0,
        reply_before_status=True,
        reply_share=REPLY_SHARE,
        reply_delay_ms=300.0,
        seed=SEED,
    )
    extra = {
        "daemon": {"stop_timeout_s": 4.0},
        "provider": {
            "timeout_s": 1.0,
            "connect_timeout_s": 1.0,
            "confirm_window_s": 12.0,
        },
        "workers": {"soft_time_limit_s": 1.5, "hard_time_limit_s": 2.5},
    }
    phones = ch.contact_phones(24, invalid_every=0)
    repliers = {
        p
        for p in phones
        if reply_plan(p, seed=SEED, reply_share=REPLY_SHARE, opt_out_share=0.0)
    }
    assert repliers
    with meta_daemon(work, options, extra) as (daemon, cfg, fake, _):
        campaign_id = ch.seed_campaign(cfg, phones)

        def done() -> bool:
            counts = fake.phone_counts()
            return (
                all(counts.get(p, {}).get("m1") for p in phones)
                and all(counts.get(p, {}).get("m2") for p in repliers)
                and not open_rows(campaign_id)
                and fake.stats()["webhooks_pending"] == 0
            )

        try:
            ch.wait_until(done, 60, 0.2, "every Message 1 and 2 sent and recorded")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{daemon.log_text()[-3000:]}") from None
        assert fake.stats()["slow_answers"] > 0  # some answers never came
        counts = fake.phone_counts()
        assert {p: counts[p].get("m1") for p in phones} == dict.fromkeys(phones, 1)
        assert {p: counts[p].get("m2", 0) for p in phones} == {
            p: int(p in repliers) for p in phones
        }
        assert fake.duplicates() == {}
        assert fake.stats()["per_reference_max"] == 1  # no request repeated
        with database.connection_context():
            rows = list(Message.select().where(Message.campaign == campaign_id))
        assert {r.status for r in rows} <= set(ch.SENT_OR_LATER)
        assert not any(r.resends for r in rows)
        # The wamid of each answered send is the one the fake gave.
        by_ref = {m["reference"]: m["id"] for m in fake.messages()}
        answered = [r for r in rows if r.provider_id]
        assert len(answered) >= len(rows) - fake.stats()["slow_answers"]
        assert all(r.provider_id == by_ref[r.idempotency_key] for r in answered)
