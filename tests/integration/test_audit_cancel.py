"""`campaign retry-failed` on a cancelled campaign.

The operator cancels a campaign, then asks for its failed messages to be
retried. It answered `retried: 1` and queued the row again, its failure
reason wiped; the claim refuses a cancelled campaign's rows, so the row
was then cancelled ("campaign cancelled") and its member put back to
`pending` for good: nothing was sent, the answer said otherwise, and why
the message had failed was gone from `campaign show`. A cancel is final:
the retry is refused (409 / exit code of a state error) and changes nothing.

Real parts: the send path on the real database and queues, the fake
Wassenger server on loopback (a number not on WhatsApp fails for good).
"""

from __future__ import annotations

import pytest

from daemon.app import service
from daemon.domain import campaigns
from daemon.errors import StateError
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import invalid_phone_for
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import run_queue
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

pipeline = manual_pipeline(utcnow().replace(microsecond=0))


def test_retry_failed_of_a_cancelled_campaign_is_refused(pipeline, fake):
    tasks = pipeline.tasks
    contact_id, other = seed_contacts(2)
    phone = invalid_phone_for(1)
    Contact.update(phone=phone).where(Contact.id == contact_id).execute()
    campaign = new_campaign([contact_id, other], skip_invalid=False)
    campaigns.start_campaign(campaign.id, tasks)
    message_id, _ = campaigns.fan_out(campaign.id)
    assert tasks.deliver(message_id) == "failed"
    reason = Message.get_by_id(message_id).error
    assert reason
    # Cancelled before the other contact's Message 1 went.
    campaigns.cancel_campaign(campaign.id)

    with pytest.raises(StateError, match="it is cancelled"):
        service.campaign_action(campaign.id, "retry-failed", tasks)
    run_queue(pipeline.queues.messages)

    row = Message.get_by_id(message_id)
    assert (row.status, row.error) == ("failed", reason)
    member = CampaignContact.get(
        CampaignContact.campaign == campaign.id, CampaignContact.contact == contact_id
    )
    assert member.state == "failed"
    assert campaigns.get_campaign(campaign.id).status == "cancelled"
    assert phone_shows(fake, phone) == {"m1": 0, "m2": 0}
