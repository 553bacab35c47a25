"""A reply to a Message 1 sent more than 30 days after its row was made.

The fan-out makes every Message 1 row of a campaign at its start; pacing
(`pacing.daily_cap`, WhatsApp's 250 / 1,000 messages a day for a new
number) sends them over days or months. A reply was matched to its Message 1
only if that row was *created* within the reply window plus 30 days, so a
contact reached on day 31 or later of a long paced campaign replied, and
got no Message 2 ("no_open_campaign"); the member then expired.

Real parts: the send path against the fake Wassenger server, the reply
through the real webhook ingest, on SQLite and PostgreSQL + Redis. Only the
row's creation time is moved back, as if the fan-out had made it 40 days
before its send.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
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
    extra = {"provider": {"base_url": fake.url}}
    built = build_pipeline(mode_config(request, make_config, request.param, extra))
    yield built
    built.close()


def test_a_reply_to_message_1_sent_on_day_40_gets_message_2(pipeline, fake):
    tasks = pipeline.tasks
    (contact_id,) = seed_contacts(1)
    phone = Contact.get_by_id(contact_id).phone
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    # Made by the fan-out 40 days ago; its turn under the daily cap is today.
    made = utcnow() - dt.timedelta(days=40)
    Message.update(created_at=made).where(Message.id == message_id).execute()
    assert tasks.deliver(message_id) == "sent"

    outcome = Events(tasks).apply("wassenger", wassenger_reply(phone, "Oui"))

    assert outcome == ["reply: message_2_queued"]
    (message2,) = Message.select().where(Message.kind == 2)
    assert tasks.deliver(message2.id) == "sent"
    wait_for(lambda: phone_shows(fake, phone)["m2"] == 1, 5, what="Message 2")
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 1}
    assert campaigns.get_campaign(campaign.id).status == "completed"
