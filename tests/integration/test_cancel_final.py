"""A cancel is final: no path puts a row of a cancelled campaign back in the queue.

The claim and the sweeper never look at a cancelled campaign's rows again,
so a row given back as `queued` there would sit for good and the campaign
would list it as waiting. Each test drives the real send path (`Tasks.deliver`
on the real database, the fake Wassenger server on loopback) with the cancel
landing while the row is held, and judges what the contact's phone shows
and what the operator sees of the row.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.domain import campaigns
from daemon.domain import unconfirmed
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.integration.test_opt_out_final import one_message
from tests.integration.test_opt_out_final import requests_to
from tests.send_helpers import manual_pipeline

T0 = utcnow().replace(microsecond=0)


pipeline = manual_pipeline(T0, {"retry": {"max_attempts": 4}})


class CancelDuringSend:
    """The provider client, with the operator's cancel landing mid-request."""

    def __init__(self, inner, campaign_id: int):
        self.inner = inner
        self.campaign_id = campaign_id

    def send(self, *args, **kwargs):
        campaigns.cancel_campaign(self.campaign_id)
        return self.inner.send(*args, **kwargs)


def nothing_left_to_send(pipeline) -> bool:
    later = pipeline.tasks.clock.advance(3600)
    return campaigns.sweep(later, include_queued=True).messages == []


@pytest.mark.parametrize("answer", ["server_error", "rate_limited"])
def test_a_cancel_during_a_refused_send_cancels_the_retry(pipeline, fake, answer):
    campaign, contact, message_id = one_message(pipeline)
    if answer == "server_error":
        fake.configure(fail_rate=1.0)
    else:
        fake.configure(rate_limit_rate=1.0)
    pipeline.tasks._provider = CancelDuringSend(pipeline.provider, campaign.id)

    outcome = pipeline.tasks.deliver(message_id)

    assert outcome == "cancelled: campaign cancelled"
    row = Message.get_by_id(message_id)
    assert (row.status, row.lease_owner) == ("cancelled", None)
    fake.configure(fail_rate=0.0, rate_limit_rate=0.0)
    pipeline.tasks._provider = pipeline.provider
    assert nothing_left_to_send(pipeline)
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    assert requests_to(fake, contact.phone) == 0
    assert campaigns.get_campaign(campaign.id).status == "cancelled"


def test_a_cancel_before_a_pacing_release_cancels_the_row(pipeline, fake):
    campaign, contact, message_id = one_message(pipeline)
    owner = "this-host:1:worker"
    claimed = campaigns.claim(message_id, owner, 60, T0)
    assert claimed is not None
    campaigns.cancel_campaign(campaign.id)

    released = campaigns.release(
        claimed, owner, T0 + dt.timedelta(seconds=30), "paced: rate"
    )

    assert not released
    row = Message.get_by_id(message_id)
    assert (row.status, row.error) == ("cancelled", "campaign cancelled")
    assert nothing_left_to_send(pipeline)
    assert requests_to(fake, contact.phone) == 0


def test_an_unconfirmed_send_of_a_cancelled_campaign_is_not_sent_again(pipeline, fake):
    campaign, contact, message_id = one_message(pipeline)
    owner = "this-host:1:worker"
    claimed = campaigns.claim(message_id, owner, 60, T0)
    unconfirmed.mark(claimed, owner, "timed out after the request left", T0)
    campaigns.cancel_campaign(campaign.id)
    window_s = pipeline.cfg.provider.confirm_window_s
    later = pipeline.tasks.clock.advance(window_s + 1)

    settled = unconfirmed.settle(window_s, "resend", later)

    assert settled.resent == []
    assert Message.get_by_id(message_id).status == "cancelled"
    assert nothing_left_to_send(pipeline)
    assert requests_to(fake, contact.phone) == 0


def test_a_cancel_while_a_dead_worker_held_the_row(pipeline, fake):
    campaign, contact, message_id = one_message(pipeline)
    dead_host, dead_pid = "gone-host", 999999
    dead_owner = f"{dead_host}:{dead_pid}:dead"
    assert campaigns.claim(message_id, dead_owner, 120, T0) is not None
    campaigns.cancel_campaign(campaign.id)

    # The supervisor gives back the dead worker's row that never left: queued
    # and enqueued; the claim refuses it, and the refusal cancels it.
    released = pipeline.tasks.release_dead_worker(dead_host, dead_pid, set())
    assert len(released.requeued) == 1
    pipeline.tasks.clock.set(utcnow() + dt.timedelta(seconds=1))
    assert pipeline.tasks.deliver(message_id) == "cancelled: campaign cancelled"

    assert Message.get_by_id(message_id).status == "cancelled"
    assert nothing_left_to_send(pipeline)
    assert requests_to(fake, contact.phone) == 0
