"""A reply written in time whose webhook reaches us after the campaign completed.

The contact answers Message 1 23.5 h after it was sent (inside the 24 h
reply window); the provider's webhook fails and is retried (Meta retries
for days), so the reply reaches us at 25 h. Meanwhile the hourly expiry
job expired the members that had not answered, this one among them (its
reply was not stored yet, so nothing held the expiry back), and, with no
member left open, the campaign completed. The reply's window check (at the
provider's timestamp) passed, but the member lookup only looked at running
or paused campaigns: the outcome was `no_open_campaign`, and the phone got
no Message 2, although docs/reliability.md promises that a reply retried
across the 24 h mark is still answered.

Also pinned here: a reply written after its window, a STOP, and a reply to
a cancelled campaign change nothing of the kind (no Message 2, the campaign
not reopened).

Real parts: the send path (`Tasks`) against the fake Wassenger server on
loopback, the replies through the real webhook ingest, the real expiry job,
on SQLite and on PostgreSQL + Redis. Time moves through the injected clock.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.app import jobs
from daemon.app import service
from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import Contact
from daemon.store.models import Interaction
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.event_helpers import Events
from tests.event_helpers import wassenger_reply
from tests.helpers import wait_for
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0


@pytest.fixture
def fake_options() -> FakeOptions:
    return FakeOptions(ack_delays_ms=())


pipeline = manual_pipeline(utcnow().replace(microsecond=0))


def phones(contact_ids: list[int]) -> list[str]:
    return [Contact.get_by_id(i).phone for i in contact_ids]


def sent_campaign(pipeline, count: int):
    """A running campaign of `count` new contacts, every Message 1 sent now
    (the clock's T0). (campaign id, contact ids, T0)."""
    contacts = seed_contacts(count)
    campaign = new_campaign(contacts)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    for message_id in campaigns.fan_out(campaign.id):
        assert pipeline.tasks.deliver(message_id) == "sent"
    return campaign.id, contacts, pipeline.clock()


def expired_and_completed(pipeline, campaign_id: int, t0, members: int) -> None:
    """The hourly expiry job at 24.5 h: nobody's reply stored, every member
    expires and the campaign completes."""
    now = pipeline.clock.set(t0 + dt.timedelta(hours=24.5))
    result = jobs.run("check_expired_interactions", pipeline.tasks, now)
    assert result == f"expired {members}"
    assert campaigns.campaign_summary(campaign_id)["members"] == {"expired": members}
    assert campaigns.get_campaign(campaign_id).status == "completed"


def late_webhook(pipeline, t0, phone: str, text: str, written_h: float) -> list[str]:
    """The reply written at `written_h` after T0 (the provider's timestamp),
    reaching us (stored and processed) at 25 h after T0."""
    pipeline.clock.set(t0 + dt.timedelta(hours=25))
    written = (t0 + dt.timedelta(hours=written_h)).replace(tzinfo=dt.UTC)
    body = wassenger_reply(phone, text, written=written.timestamp())
    return Events(pipeline.tasks, clock=pipeline.clock).apply("wassenger", body)


def message2_rows(campaign_id: int) -> list[Message]:
    return list(
        Message.select().where(Message.campaign == campaign_id, Message.kind == 2)
    )


def test_a_reply_written_in_time_gets_message_2_after_the_campaign_completed(
    pipeline, fake
):
    campaign_id, contacts, t0 = sent_campaign(pipeline, 3)
    replier, *silent = phones(contacts)
    expired_and_completed(pipeline, campaign_id, t0, 3)

    # Written at 23.5 h, in time; the provider's retry reaches us at 25 h.
    outcome = late_webhook(pipeline, t0, replier, "Oui", written_h=23.5)

    assert outcome == ["reply: message_2_queued"]
    (message2,) = message2_rows(campaign_id)
    assert message2.contact_id == contacts[0]
    # Back to running, so that Message 2 may be claimed.
    assert campaigns.get_campaign(campaign_id).status == "running"
    assert pipeline.tasks.deliver(message2.id) == "sent"
    wait_for(lambda: phone_shows(fake, replier)["m2"] == 1, 5, what="Message 2")

    assert phone_shows(fake, replier) == {"m1": 1, "m2": 1}
    for phone in silent:
        assert phone_shows(fake, phone) == {"m1": 1, "m2": 0}
    assert campaigns.campaign_summary(campaign_id)["members"] == {
        "message_2_sent": 1,
        "expired": 2,
    }
    assert campaigns.get_campaign(campaign_id).status == "completed"
    # A second message of theirs, also late: nothing more.
    again = late_webhook(pipeline, t0, replier, "Oui !", written_h=23.6)
    assert again == ["reply: no_open_campaign"]
    assert len(message2_rows(campaign_id)) == 1
    assert campaigns.get_campaign(campaign_id).status == "completed"
    assert phone_shows(fake, replier) == {"m1": 1, "m2": 1}


def test_a_reply_written_after_its_window_does_not_reopen_the_campaign(pipeline, fake):
    campaign_id, contacts, t0 = sent_campaign(pipeline, 2)
    replier, _ = phones(contacts)
    expired_and_completed(pipeline, campaign_id, t0, 2)

    # Written 10 min past the 24 h window.
    outcome = late_webhook(pipeline, t0, replier, "Oui", written_h=24 + 1 / 6)

    assert outcome == ["reply: no_open_campaign"]
    assert message2_rows(campaign_id) == []
    assert campaigns.get_campaign(campaign_id).status == "completed"
    assert campaigns.campaign_summary(campaign_id)["members"] == {"expired": 2}
    assert phone_shows(fake, replier) == {"m1": 1, "m2": 0}


def test_a_stop_written_in_time_to_a_completed_campaign_opts_out(pipeline, fake):
    campaign_id, contacts, t0 = sent_campaign(pipeline, 2)
    stopper, _ = phones(contacts)
    expired_and_completed(pipeline, campaign_id, t0, 2)

    outcome = late_webhook(pipeline, t0, stopper, "STOP", written_h=23.5)

    assert outcome == ["reply: opted_out"]
    assert Contact.get_by_id(contacts[0]).opted_out_at is not None
    # Another message of theirs, also written in time, gets nothing either.
    after = late_webhook(pipeline, t0, stopper, "Oui", written_h=23.6)
    assert after == ["reply: opted_out_before"]
    assert message2_rows(campaign_id) == []
    assert campaigns.get_campaign(campaign_id).status == "completed"
    assert phone_shows(fake, stopper) == {"m1": 1, "m2": 0}


def test_a_reply_in_time_to_a_cancelled_campaign_never_reopens_it(pipeline, fake):
    campaign_id, contacts, t0 = sent_campaign(pipeline, 2)
    replier, _ = phones(contacts)
    service.campaign_action(campaign_id, "cancel", pipeline.tasks)
    pipeline.clock.set(t0 + dt.timedelta(hours=24.5))
    jobs.run("check_expired_interactions", pipeline.tasks, pipeline.clock())

    outcome = late_webhook(pipeline, t0, replier, "Oui", written_h=23.5)

    assert outcome == ["reply: no_open_campaign"]
    assert message2_rows(campaign_id) == []
    assert campaigns.get_campaign(campaign_id).status == "cancelled"
    interaction = Interaction.get(Interaction.contact == contacts[0])
    assert interaction.campaign_id is None
    assert phone_shows(fake, replier) == {"m1": 1, "m2": 0}
