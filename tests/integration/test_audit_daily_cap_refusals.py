"""The daily cap counts messages the provider took, not refusals.

`pacing.daily_cap` keeps a device under WhatsApp's daily limits. Each
Message 1 took a unit before its request, and kept it whatever the answer:
numbers refused (400, not on WhatsApp) and a provider rate-limiting us (429)
used up the day, so a campaign stopped at "daily cap reached" with few
messages sent. A refusal now gives its unit back; a 5xx keeps it (the
provider may have taken the message: see the fake's fail_after_accept).

Real parts: the send path (`Tasks.deliver`) on the real database and
queues, the fake Wassenger server on loopback, on SQLite and PostgreSQL +
Redis; time through the injected clock.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.domain.pacing import sent_today
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import invalid_phone_for
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

START = utcnow().replace(hour=9, minute=0, second=0, microsecond=0)
CAP = {"pacing": {"per_minute": 0, "daily_cap": 2, "jitter_s": 0.0}}

pipeline = manual_pipeline(START, CAP)


def campaign_rows(pipeline, contact_ids) -> list[int]:
    campaign = new_campaign(contact_ids, skip_invalid=False)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    return campaigns.fan_out(campaign.id)


def phone_of(message_id: int) -> str:
    return Contact.get_by_id(Message.get_by_id(message_id).contact_id).phone


def device_sent_today(pipeline) -> int:
    return sent_today(pipeline.cfg.provider.device, pipeline.clock())


def test_numbers_refused_do_not_use_up_the_day(pipeline, fake):
    invalid = [
        Contact.create(
            phone=invalid_phone_for(i),
            name=f"Gone {i}",
            variables={"city": "Lyon"},
            created_at=utcnow(),
        ).id
        for i in range(3)
    ]
    valid = seed_contacts(2)
    rows = campaign_rows(pipeline, invalid + valid)

    outcomes = [pipeline.tasks.deliver(i) for i in rows]

    assert outcomes == ["failed"] * 3 + ["sent"] * 2
    for message_id in rows[3:]:
        assert phone_shows(fake, phone_of(message_id)) == {"m1": 1, "m2": 0}
    assert device_sent_today(pipeline) == 2


def test_a_rate_limited_send_gives_its_unit_back_and_takes_one_when_it_goes(
    pipeline, fake
):
    (first, second) = campaign_rows(pipeline, seed_contacts(2))
    fake.configure(rate_limit_rate=1.0)
    assert pipeline.tasks.deliver(first).startswith("retry at")
    assert device_sent_today(pipeline) == 0

    fake.configure(rate_limit_rate=0.0)
    pipeline.clock.advance(60)
    assert pipeline.tasks.deliver(first) == "sent"
    assert pipeline.tasks.deliver(second) == "sent"
    assert device_sent_today(pipeline) == 2


def test_a_5xx_keeps_its_unit(pipeline, fake):
    (first, second, third) = campaign_rows(pipeline, seed_contacts(3))
    # 500 after the provider took it: the phone has the message.
    fake.configure(fail_after_accept_rate=1.0)
    pipeline.tasks.deliver(first)
    fake.configure(fail_after_accept_rate=0.0)

    assert device_sent_today(pipeline) == 1
    assert pipeline.tasks.deliver(second) == "sent"
    assert pipeline.tasks.deliver(third) == "deferred: daily cap reached"
    assert device_sent_today(pipeline) == 2
