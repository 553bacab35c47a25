"""A campaign completed in the instant a reply took one of its members.

`maybe_complete` checks that no member is open, then completes the
campaign in a second statement. A reply processed between the two (the
last expired member taking a reply written in time, its Message 2 queued)
left that member open in a completed campaign: no send is claimed there,
and nothing ran the campaign again, so the phone never got its Message 2.
The recovery job now runs such a campaign again.

The race itself is a few microseconds wide; here its outcome is made with
the same statement the completion runs (the campaign set completed over
the open member), then everything else is the daemon's own: the reply
through the real webhook ingest, the recovery job, the send path against
the fake Wassenger server on loopback, on SQLite and PostgreSQL + Redis.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.app import jobs
from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import Campaign
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
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


@pytest.fixture
def fake_options() -> FakeOptions:
    return FakeOptions(ack_delays_ms=())


pipeline = manual_pipeline(utcnow().replace(microsecond=0))


def test_a_campaign_completed_over_an_open_member_runs_again(pipeline, fake):
    (contact_id,) = seed_contacts(1)
    phone = Contact.get_by_id(contact_id).phone
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message1,) = campaigns.fan_out(campaign.id)
    assert pipeline.tasks.deliver(message1) == "sent"

    # The reply, an hour later: member interacted, Message 2 queued.
    now = pipeline.clock.advance(3600)
    written = now.replace(tzinfo=dt.UTC).timestamp()
    outcome = Events(pipeline.tasks, clock=pipeline.clock).apply(
        "wassenger", wassenger_reply(phone, "Oui", written=written)
    )
    assert outcome == ["reply: message_2_queued"]
    (message2,) = Message.select().where(
        Message.campaign == campaign.id, Message.kind == 2
    )
    # The racing completion's second statement lands over it.
    Campaign.update(status=CampaignStatus.COMPLETED, finished_at=now).where(
        Campaign.id == campaign.id
    ).execute()
    assert pipeline.tasks.deliver(message2.id) == "not claimable"

    report = jobs.run("recover_interrupted_campaigns", pipeline.tasks, now)

    assert "repaired 1" in report
    assert campaigns.get_campaign(campaign.id).status == "running"
    assert pipeline.tasks.deliver(message2.id) == "sent"
    wait_for(lambda: phone_shows(fake, phone)["m2"] == 1, 5, what="Message 2")
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 1}
    # Settled: it completes again, and the next run changes nothing.
    assert campaigns.get_campaign(campaign.id).status == "completed"
    again = jobs.run("recover_interrupted_campaigns", pipeline.tasks, now)
    assert "repaired 0" in again
    assert campaigns.get_campaign(campaign.id).status == "completed"
