"""A STOP is final: no path puts a row of an opted-out contact back in a send.

Each test drives the real send path (`Tasks.deliver` on the real database,
the fake Wassenger server on loopback) and judges what the contact's phone
would show: the requests the provider received for that number.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.domain import campaigns
from daemon.domain import unconfirmed
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import manual_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

T0 = utcnow().replace(microsecond=0)
DEAD_HOST, DEAD_PID = "gone-host", 999999
DEAD_OWNER = f"{DEAD_HOST}:{DEAD_PID}:dead"


pipeline = manual_pipeline(T0, {"retry": {"max_attempts": 4}})


def requests_to(fake, phone: str) -> int:
    """Messages the provider took for this phone: what the phone shows."""
    return sum(1 for m in fake.messages() if m["phone"] == phone)


def one_message(pipeline):
    (contact_id,) = seed_contacts(1)
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    return campaign, Contact.get_by_id(contact_id), message_id


def stop(contact: Contact) -> None:
    campaigns.opt_out_contact(Contact.get_by_id(contact.id), "replied 'STOP'")


def campaign_status(campaign) -> str:
    return campaigns.get_campaign(campaign.id).status


def member_state(campaign, contact) -> str:
    return (
        CampaignContact.get(
            CampaignContact.campaign == campaign.id,
            CampaignContact.contact == contact.id,
        )
    ).state


class OptOutDuringSend:
    """The provider client, with the contact's STOP landing mid-request."""

    def __init__(self, inner, contact: Contact):
        self.inner = inner
        self.contact = contact

    def send(self, *args, **kwargs):
        stop(self.contact)
        return self.inner.send(*args, **kwargs)


def test_retry_failed_leaves_an_opted_out_contact_alone(pipeline, fake):
    campaign, contact, message_id = one_message(pipeline)
    fake.configure(down=True)
    clock = pipeline.tasks.clock
    for _ in range(4):  # retry.max_attempts: every attempt refused
        pipeline.tasks.deliver(message_id)
        clock.advance(3600)
    assert Message.get_by_id(message_id).status == "failed"
    fake.configure(down=False)
    stop(contact)

    assert campaigns.retry_failed(campaign.id, pipeline.tasks) == 0
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    assert requests_to(fake, contact.phone) == 0
    assert Message.get_by_id(message_id).status == "failed"


@pytest.mark.parametrize("answer", ["server_error", "rate_limited"])
def test_stop_during_a_refused_send_cancels_the_retry(pipeline, fake, answer):
    campaign, contact, message_id = one_message(pipeline)
    if answer == "server_error":
        fake.configure(fail_rate=1.0)
    else:
        fake.configure(rate_limit_rate=1.0)
    pipeline.tasks._provider = OptOutDuringSend(pipeline.provider, contact)

    outcome = pipeline.tasks.deliver(message_id)

    assert outcome == "cancelled: contact opted out"
    row = Message.get_by_id(message_id)
    assert row.status == "cancelled" and row.lease_owner is None
    fake.configure(fail_rate=0.0, rate_limit_rate=0.0)
    pipeline.tasks._provider = pipeline.provider
    pipeline.tasks.clock.advance(3600)
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    assert requests_to(fake, contact.phone) == 0
    assert member_state(campaign, contact) == MemberState.OPTED_OUT
    assert campaign_status(campaign) == "completed"


def test_stop_during_a_timed_out_send_cancels_the_retry(request, make_config, fake):
    # A provider slower than our timeout: the request times out on our side.
    fake.configure(latency_ms=1500)
    cfg = mode_config(
        request,
        make_config,
        "sqlite",
        {"provider": {"base_url": fake.url, "timeout_s": 0.3}},
    )
    pipeline = build_pipeline(cfg, ManualClock(T0))
    try:
        campaign, contact, message_id = one_message(pipeline)
        pipeline.tasks._provider = OptOutDuringSend(pipeline.provider, contact)
        assert pipeline.tasks.deliver(message_id) == "cancelled: contact opted out"
        pipeline.tasks._provider = pipeline.provider
        pipeline.tasks.clock.advance(3600)
        assert pipeline.tasks.deliver(message_id) == "not claimable"
        assert Message.get_by_id(message_id).status == "cancelled"
    finally:
        pipeline.close()


def test_stop_before_a_pacing_release_cancels_the_row(pipeline, fake):
    campaign, contact, message_id = one_message(pipeline)
    owner = "this-host:1:worker"
    claimed = campaigns.claim(message_id, owner, 60, T0)
    assert claimed is not None
    stop(contact)

    released = campaigns.release(
        claimed, owner, T0 + dt.timedelta(seconds=30), "paced: rate"
    )

    assert not released
    assert Message.get_by_id(message_id).status == "cancelled"
    pipeline.tasks.clock.advance(60)
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    assert requests_to(fake, contact.phone) == 0
    assert campaign_status(campaign) == "completed"


@pytest.mark.parametrize("recovery", ["supervisor_release", "lease_expiry_sweep"])
def test_stop_while_a_dead_worker_held_the_row(pipeline, fake, recovery):
    campaign, contact, message_id = one_message(pipeline)
    assert campaigns.claim(message_id, DEAD_OWNER, 120, T0) is not None
    stop(contact)

    if recovery == "supervisor_release":
        released = pipeline.tasks.release_dead_worker(DEAD_HOST, DEAD_PID, set())
        assert len(released.requeued) == 1
        # The release stamps the wall clock; this test's clock started earlier.
        pipeline.tasks.clock.set(utcnow() + dt.timedelta(seconds=1))
        outcome = pipeline.tasks.deliver(message_id)
        assert outcome == "cancelled: contact opted out"
    else:
        # Nobody saw the worker die: its request may have left, so the row
        # waits for evidence, and is not re-sent to an opted-out contact.
        later = pipeline.tasks.clock.advance(600)
        assert campaigns.sweep(later, include_queued=True).messages == []
        assert Message.get_by_id(message_id).status == "unconfirmed"
        later = pipeline.tasks.clock.advance(pipeline.cfg.provider.confirm_window_s + 1)
        settled = unconfirmed.settle(
            pipeline.cfg.provider.confirm_window_s, "resend", later
        )
        assert settled.resent == []

    assert Message.get_by_id(message_id).status == "cancelled"
    assert requests_to(fake, contact.phone) == 0
    assert campaign_status(campaign) == "completed"
    # Nothing is left for the sweeper to bring back.
    later = pipeline.tasks.clock.advance(3600)
    assert campaigns.sweep(later, include_queued=True).messages == []


@pytest.mark.parametrize("kind", [1, 2])
def test_the_claim_refuses_a_row_of_an_opted_out_contact(pipeline, fake, kind):
    campaign, contact, message_id = one_message(pipeline)
    if kind == 2:
        pipeline.tasks.deliver(message_id)
        reply = campaigns.handle_reply(
            contact.phone,
            "Oui",
            is_group=False,
            window_h=24,
            opt_out_keywords=["STOP"],
            now=pipeline.tasks.clock(),
        )
        message_id = reply.message2_id
        assert message_id is not None
    before = requests_to(fake, contact.phone)
    # Opted out by another process (an import, another host) without the
    # cancellation of its rows: the claim itself must refuse them.
    Contact.update(opted_out_at=utcnow()).where(Contact.id == contact.id).execute()

    assert (
        campaigns.claim(message_id, "someone:1:x", 60, pipeline.tasks.clock()) is None
    )
    assert pipeline.tasks.deliver(message_id) == "cancelled: contact opted out"
    assert requests_to(fake, contact.phone) == before
    assert Message.get_by_id(message_id).status == "cancelled"
