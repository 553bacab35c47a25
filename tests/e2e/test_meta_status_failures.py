"""Meta's failed statuses, end to end: the real daemon against the fake's
Meta dialect, whose sends are accepted (200) and then fail by status webhook
as Meta's do. A number not on WhatsApp (131026) fails its member; a contact
who stopped marketing messages (131050) is opted out, for good.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from daemon import testing as ch
from daemon.providers.fake import FakeOptions
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import database
from tests.meta_helpers import meta_daemon
from tests.meta_helpers import wait_settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="meta-failed-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def members(campaign_id: int) -> dict[str, str]:
    with database.connection_context():
        query = (
            CampaignContact.select(CampaignContact.state, Contact.phone)
            .join(Contact)
            .where(CampaignContact.campaign == campaign_id)
        )
        return {m.contact.phone: m.state for m in query}


def test_failed_statuses_fail_the_member_or_opt_the_contact_out(work):
    # Every third number is not on WhatsApp; the others stopped marketing.
    options = FakeOptions(
        ack_delays_ms=(20.0, 40.0, 60.0),
        reply_share=1.0,
        status_failure_share=1.0,
        status_failure_code=131050,
    )
    phones = ch.contact_phones(9, invalid_every=3)
    invalid = {p for p in phones if p.endswith("0000")}
    with meta_daemon(work, options) as (daemon, cfg, fake, _):
        campaign_id = ch.seed_campaign(cfg, phones)
        wait_settled(daemon, fake, campaign_id, 60)
        # Accepted, and reached no phone: nobody could reply.
        assert fake.stats()["sends_accepted"] == len(phones)
        assert fake.phone_counts() == {} and fake.stats()["replies_sent"] == 0
        codes = {m["phone"]: m["failed_code"] for m in fake.messages()}
        assert codes == {p: 131026 if p in invalid else 131050 for p in phones}
        with database.connection_context():
            rows = list(Message.select().where(Message.campaign == campaign_id))
            opted = {
                c.phone
                for c in Contact.select().where(Contact.opted_out_at.is_null(False))
            }
        assert {r.status for r in rows} == {"failed"}
        assert {r.kind for r in rows} == {1}
        assert opted == set(phones) - invalid
        states = members(campaign_id)
        assert {states[p] for p in invalid} == {"failed"}
        assert {states[p] for p in set(phones) - invalid} == {"opted_out"}
        assert ch.campaign_state(campaign_id)["status"] == "completed"
