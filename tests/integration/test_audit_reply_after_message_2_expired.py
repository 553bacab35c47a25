"""A contact writes again after their Message 2 expired unsent.

With `campaigns.reply_window_h` above 24 h (allowed up to 30 days), a reply
can come back inside the reply window after the contact's Message 2 expired:
the operator paused the campaign and resumed it more than 24 h after the
first reply, so the Message 2 was claimed past WhatsApp's window and expired
(row and member). The contact then writes again, which opens a new 24 h
window. That reply took the expired member back to `interacted`, but its
Message 2 row already existed (unique per campaign, contact and kind), so
the insert was ignored: nothing was queued, the interaction said
"message_2", and the member stayed `interacted` for good, so the campaign
never completed. The phone got no Message 2.

Real parts: the send path against the fake Wassenger server, the replies
through the real webhook ingest, on SQLite and PostgreSQL + Redis. Only the
times of the first send and reply are moved back (as the reply-window
tests do).
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
    extra = {
        "provider": {"base_url": fake.url},
        "campaigns": {"reply_window_h": 48.0},
    }
    built = build_pipeline(mode_config(request, make_config, request.param, extra))
    yield built
    built.close()


def hours_ago(hours: float) -> dt.datetime:
    return utcnow() - dt.timedelta(hours=hours)


def test_a_new_reply_after_an_expired_message_2_gets_it_and_completes(pipeline, fake):
    tasks = pipeline.tasks
    events = Events(tasks)
    contacts = seed_contacts(2)
    phone = Contact.get_by_id(contacts[0]).phone
    campaign = new_campaign(contacts)
    campaigns.start_campaign(campaign.id, tasks)
    for message_id in campaigns.fan_out(campaign.id):
        assert tasks.deliver(message_id) == "sent"
    assert events.apply("wassenger", wassenger_reply(phone, "Oui")) == [
        "reply: message_2_queued"
    ]
    (message2,) = Message.select().where(Message.kind == 2)
    # The operator pauses the campaign before Message 2 goes out.
    service.campaign_action(campaign.id, "pause", tasks)
    # Message 1 went out 26 h ago, the contact answered 25 h ago.
    Message.update(sent_at=hours_ago(26), created_at=hours_ago(26)).where(
        Message.kind == 1
    ).execute()
    CampaignContact.update(message1_sent_at=hours_ago(26)).execute()
    CampaignContact.update(interacted_at=hours_ago(25)).where(
        CampaignContact.contact == contacts[0]
    ).execute()
    Message.update(created_at=hours_ago(25)).where(Message.id == message2.id).execute()
    # Resumed now: WhatsApp's 24 h window closed, Message 2 expires unsent.
    service.campaign_action(campaign.id, "resume", tasks)
    assert tasks.deliver(message2.id).startswith("expired")
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 0}

    # The contact writes again, inside the 48 h reply window.
    outcome = events.apply("wassenger", wassenger_reply(phone, "Vous êtes là ?"))

    assert outcome == ["reply: message_2_queued"]
    assert tasks.deliver(message2.id) == "sent"
    wait_for(lambda: phone_shows(fake, phone)["m2"] == 1, 5, what="Message 2")
    # The other contact never answers: expired once the window is over; the
    # campaign completes.
    later = utcnow() + dt.timedelta(hours=23)
    assert jobs.run("check_expired_interactions", tasks, later).endswith("expired 1")
    assert campaigns.campaign_summary(campaign.id)["members"] == {
        "message_2_sent": 1,
        "expired": 1,
    }
    assert campaigns.get_campaign(campaign.id).status == "completed"
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 1}
