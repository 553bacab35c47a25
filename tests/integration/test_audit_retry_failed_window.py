"""`campaign retry-failed` of a Message 1 the provider failed after taking it.

A Message 1 accepted by the provider, then reported failed by its status
webhook (undeliverable), keeps the time of that first acceptance. When the
operator retries it days later, the new send went out with the old time
kept (`COALESCE(sent_at, now)`, and the member's `message1_sent_at` alike):
the reply window and the expiry were judged from the first, failed send.
So the hourly expiry job expired the member at once, and the contact's reply
to the Message 1 they had just received got no Message 2.

Real parts: the send path against the fake Wassenger server, the status and
the reply through the real webhook ingest, on SQLite and PostgreSQL + Redis.
Only the first send's time is moved back (two days), as the earlier tests
of the reply window do.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.app import jobs
from daemon.app import service
from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.event_helpers import Events
from tests.event_helpers import wassenger_failed
from tests.event_helpers import wassenger_reply
from tests.helpers import wait_for
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake_options() -> FakeOptions:
    return FakeOptions(ack_delays_ms=())


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline(request, make_config, fake):
    extra = {"provider": {"base_url": fake.url}}
    built = build_pipeline(mode_config(request, make_config, request.param, extra))
    yield built
    built.close()


def first_send_was(hours_ago: float, message_id: int) -> None:
    """The first send (made for real just now) happened `hours_ago`."""
    when = utcnow() - dt.timedelta(hours=hours_ago)
    row = Message.get_by_id(message_id)
    Message.update(sent_at=when, created_at=when).where(
        Message.id == message_id
    ).execute()
    CampaignContact.update(message1_sent_at=when).where(
        CampaignContact.campaign == row.campaign_id,
        CampaignContact.contact == row.contact_id,
    ).execute()


def test_a_retried_message_1_opens_its_own_reply_window(pipeline, fake):
    tasks = pipeline.tasks
    events = Events(tasks)
    (contact_id,) = seed_contacts(1)
    phone = Contact.get_by_id(contact_id).phone
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    assert tasks.deliver(message_id) == "sent"
    key = Message.get_by_id(message_id).idempotency_key
    # The provider took it, then reported it failed (undeliverable).
    outcome = events.apply("wassenger", wassenger_failed(reference=key))
    assert outcome == ["status failed: applied"]
    first_send_was(48, message_id)

    # Two days later the operator retries the failed messages.
    assert service.campaign_action(campaign.id, "retry-failed", tasks) == {"retried": 1}
    assert tasks.deliver(message_id) == "sent"
    wait_for(lambda: phone_shows(fake, phone)["m1"] == 2, 5, what="the retry")
    # The hourly expiry job runs: the Message 1 just sent is not expired.
    assert jobs.run("check_expired_interactions", tasks, utcnow()).endswith("expired 0")
    assert campaigns.campaign_summary(campaign.id)["members"] == {"message_1_sent": 1}

    # The contact answers the Message 1 they just received.
    outcome = events.apply("wassenger", wassenger_reply(phone, "Oui"))

    assert outcome == ["reply: message_2_queued"]
    (message2,) = Message.select().where(Message.kind == 2)
    assert tasks.deliver(message2.id) == "sent"
    wait_for(lambda: phone_shows(fake, phone)["m2"] == 1, 5, what="Message 2")
    assert phone_shows(fake, phone) == {"m1": 2, "m2": 1}
    assert campaigns.get_campaign(campaign.id).status == "completed"
