"""A STOP, a pause or a cancel while a Message 1 waits for its pacing slot.

A paced Message 1 may wait up to 5 s in its worker thread for its slot
(`pacing.per_minute`), after the claim checked that it may go. What came in
during that wait was not looked at again: a contact who wrote STOP, or a
campaign the operator cancelled or paused, still got the message.

Real parts: the send path (`Tasks.deliver`) on the real database and queues,
the fake Wassenger server on loopback, the operator's and the webhook's own
domain calls. The wait is the pacer's, taken through the Tasks' `sleep`; the
test makes the STOP or the operator's command land inside it.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.domain.pacing import sent_today
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

START = utcnow().replace(microsecond=0)
PACING = {"pacing": {"per_minute": 12, "daily_cap": 0, "jitter_s": 0.0}}

pipeline = manual_pipeline(START, PACING)


def two_paced_sends(pipeline):
    """A running campaign of two: the first Message 1 goes at once, the
    second must wait 5 s for its slot. (campaign, second row, its phone)"""
    contact_ids = seed_contacts(2)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    first, second = campaigns.fan_out(campaign.id)
    assert pipeline.tasks.deliver(first) == "sent"
    assert pipeline.sleeps == []
    phone = Contact.get_by_id(Message.get_by_id(second).contact_id).phone
    return campaign, second, phone


def during_the_wait(pipeline, action) -> None:
    """`action` runs while the next send waits for its slot."""

    def sleep(seconds: float) -> None:
        pipeline.sleeps.append(seconds)
        action()

    pipeline.tasks.sleep = sleep


def test_a_stop_during_the_pacing_wait_is_obeyed(pipeline, fake):
    _, second, phone = two_paced_sends(pipeline)
    contact = Contact.get(Contact.phone == phone)
    during_the_wait(
        pipeline, lambda: campaigns.opt_out_contact(contact, "keyword STOP")
    )

    outcome = pipeline.tasks.deliver(second)

    assert pipeline.sleeps == [5.0]
    assert outcome.startswith("not sendable")
    assert phone_shows(fake, phone) == {"m1": 0, "m2": 0}
    assert Message.get_by_id(second).status == "cancelled"


def test_a_cancel_during_the_pacing_wait_is_obeyed(pipeline, fake):
    campaign, second, phone = two_paced_sends(pipeline)
    during_the_wait(pipeline, lambda: campaigns.cancel_campaign(campaign.id))

    pipeline.tasks.deliver(second)

    assert phone_shows(fake, phone) == {"m1": 0, "m2": 0}
    assert Message.get_by_id(second).status == "cancelled"


def test_a_pause_during_the_pacing_wait_holds_the_send_until_resume(pipeline, fake):
    campaign, second, phone = two_paced_sends(pipeline)
    during_the_wait(pipeline, lambda: campaigns.pause_campaign(campaign.id))

    pipeline.tasks.deliver(second)

    assert phone_shows(fake, phone) == {"m1": 0, "m2": 0}
    row = Message.get_by_id(second)
    assert (row.status, row.lease_owner) == ("queued", None)

    # Resumed a minute later: the row goes, once.
    pipeline.clock.advance(60)
    pipeline.tasks.sleep = pipeline.sleeps.append
    campaigns.resume_campaign(campaign.id, pipeline.tasks)
    assert pipeline.tasks.deliver(second) == "sent"
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 0}


def test_nothing_changed_during_the_wait_the_send_goes(pipeline, fake):
    _, second, phone = two_paced_sends(pipeline)
    during_the_wait(pipeline, lambda: None)

    assert pipeline.tasks.deliver(second) == "sent"
    assert pipeline.sleeps == [5.0]
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 0}


capped = manual_pipeline(
    START, {"pacing": {"per_minute": 12, "daily_cap": 10, "jitter_s": 0.0}}
)


def test_a_send_handed_back_after_the_wait_gives_back_its_daily_unit(capped, fake):
    _, second, phone = two_paced_sends(capped)
    contact = Contact.get(Contact.phone == phone)
    during_the_wait(capped, lambda: campaigns.opt_out_contact(contact, "STOP"))

    capped.tasks.deliver(second)

    assert phone_shows(fake, phone) == {"m1": 0, "m2": 0}
    assert sent_today(capped.cfg.provider.device, capped.clock()) == 1
