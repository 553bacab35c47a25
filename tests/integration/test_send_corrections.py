"""Small send-path rules: Message 2 inside its window, the reply's own time,
retries paced again, and Meta's campaign-level codes read from one table.

The real send path (`Tasks`) on the real database, the fake Wassenger server
on loopback, and an injected clock instead of sleeps.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from daemon.domain import campaigns
from daemon.providers import meta
from daemon.providers import webhook_parser
from daemon.store.models import CampaignContact
from daemon.store.models import InboundEvent
from daemon.store.models import Interaction
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

T0 = utcnow().replace(microsecond=0)
HOUR = 3600


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline_for(request, make_config, fake):
    built = []

    def build(extra: dict | None = None):
        extra = dict(extra or {})
        extra["provider"] = {"base_url": fake.url, **extra.get("provider", {})}
        cfg = mode_config(request, make_config, request.param, extra)
        pipeline = build_pipeline(cfg, ManualClock(T0))
        built.append(pipeline)
        return pipeline

    yield build
    for pipeline in built:
        pipeline.close()


def sent_campaign(pipeline, count: int = 1):
    """A running campaign whose Message 1s were sent at the clock's time."""
    contact_ids = seed_contacts(count)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    for message_id in ids:
        assert pipeline.tasks.deliver(message_id) == "sent"
    return campaign, ids


def phones_at_fake(fake, kind_text: str) -> list[str]:
    return [m["phone"] for m in fake.messages() if m["message"].startswith(kind_text)]


def wassenger_reply(phone: str, text: str, written_at: dt.datetime) -> dict:
    at = int(written_at.replace(tzinfo=dt.UTC).timestamp())
    return {
        "id": f"in-{phone}-{at}",
        "event": "message:in:new",
        "data": {
            "id": f"in-{phone}-{at}",
            "type": "text",
            "fromNumber": phone,
            "from": phone.lstrip("+") + "@c.us",
            "timestamp": at,
            "body": text,
            "chat": {"id": phone.lstrip("+") + "@c.us", "type": "chat"},
            "meta": {"isGroup": False},
        },
    }


def stored_event(item: dict, received_at: dt.datetime) -> int:
    return InboundEvent.create(
        provider="wassenger",
        dedupe_key=f"wassenger:{item['id']}",
        event_type=item["event"],
        payload=json.dumps(item),
        received_at=received_at,
    ).id


def test_message_2_of_a_campaign_resumed_after_the_window_expires(pipeline_for, fake):
    pipeline = pipeline_for()
    campaign, (message1_id,) = sent_campaign(pipeline)
    phone = Message.get_by_id(message1_id).phone
    reply = campaigns.handle_reply(
        phone,
        "Oui",
        is_group=False,
        window_h=24,
        opt_out_keywords=["STOP"],
        now=pipeline.tasks.clock(),
    )
    campaigns.pause_campaign(campaign.id, "operator")
    pipeline.tasks.clock.advance(25 * HOUR)
    campaigns.resume_campaign(campaign.id, pipeline.tasks)

    outcome = pipeline.tasks.deliver(reply.message2_id)

    assert outcome == "expired: WhatsApp's 24 h window closed"
    assert Message.get_by_id(reply.message2_id).status == "expired"
    member = CampaignContact.get(CampaignContact.campaign == campaign.id)
    assert member.state == MemberState.EXPIRED
    assert phones_at_fake(fake, "Merci") == []
    assert campaigns.get_campaign(campaign.id).status == "completed"


def test_message_2_inside_the_window_is_sent_after_a_pause(pipeline_for, fake):
    pipeline = pipeline_for()
    campaign, (message1_id,) = sent_campaign(pipeline)
    phone = Message.get_by_id(message1_id).phone
    reply = campaigns.handle_reply(
        phone,
        "Oui",
        is_group=False,
        window_h=24,
        opt_out_keywords=["STOP"],
        now=pipeline.tasks.clock(),
    )
    campaigns.pause_campaign(campaign.id, "operator")
    pipeline.tasks.clock.advance(23 * HOUR)
    campaigns.resume_campaign(campaign.id, pipeline.tasks)

    assert pipeline.tasks.deliver(reply.message2_id) == "sent"
    assert phones_at_fake(fake, "Merci") == [phone]


def test_a_reply_written_in_the_window_and_delivered_late_is_answered(
    pipeline_for, fake
):
    pipeline = pipeline_for()
    campaign, (message1_id,) = sent_campaign(pipeline)
    phone = Message.get_by_id(message1_id).phone
    written = T0 + dt.timedelta(hours=23, minutes=59)
    # The provider retried its webhook: it reached us past the 24 h mark.
    received = T0 + dt.timedelta(hours=24, minutes=10)
    pipeline.tasks.clock.set(received)
    event_id = stored_event(wassenger_reply(phone, "Oui !", written), received)

    outcome = pipeline.tasks.process_event(event_id)

    assert outcome == "reply: message_2_queued"
    interaction = Interaction.get(Interaction.event == event_id)
    assert interaction.received_at == written


def test_a_provider_clock_ahead_of_ours_gains_nothing(pipeline_for, fake):
    pipeline = pipeline_for()
    campaign, (message1_id,) = sent_campaign(pipeline)
    phone = Message.get_by_id(message1_id).phone
    received = T0 + dt.timedelta(hours=25)
    pipeline.tasks.clock.set(received)
    claimed_at = received + dt.timedelta(hours=2)
    event_id = stored_event(wassenger_reply(phone, "Oui", claimed_at), received)

    assert pipeline.tasks.process_event(event_id) == "reply: no_open_campaign"


def test_a_retry_takes_a_new_pacing_slot(pipeline_for, fake):
    # One message a minute: an attempt that used its slot and failed must
    # wait for a slot of its own again, not skip pacing on its retry.
    pipeline = pipeline_for(
        {
            "pacing": {"per_minute": 1, "daily_cap": 0, "jitter_s": 0.0},
            "retry": {"base_s": 1.0},
        }
    )
    campaign = new_campaign(seed_contacts(2))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    first, second = campaigns.fan_out(campaign.id)
    clock = pipeline.tasks.clock
    assert pipeline.tasks.deliver(first) == "sent"  # the slot of this minute
    assert pipeline.tasks.deliver(second).startswith("deferred")  # next minute's
    clock.set(Message.get_by_id(second).next_attempt_at)
    fake.configure(fail_rate=1.0)
    assert pipeline.tasks.deliver(second).startswith("retry at")
    assert Message.get_by_id(second).paced_until is None
    fake.configure(fail_rate=0.0)
    clock.set(Message.get_by_id(second).next_attempt_at)  # one second later

    assert pipeline.tasks.deliver(second).startswith("deferred")
    assert len(fake.messages()) == 1


@pytest.mark.parametrize(
    "code,action",
    [(131050, "opt_out"), (131048, "pause"), (132015, "pause"), (132016, "pause")],
)
def test_meta_codes_mean_the_same_in_a_send_error_and_a_status(code, action):
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"phone_number_id": "1"},
                            "statuses": [
                                {
                                    "id": "wamid.X",
                                    "status": "failed",
                                    "timestamp": "1700000000",
                                    "recipient_id": "33600000001",
                                    "errors": [{"code": code, "title": "refused"}],
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    parser = webhook_parser("meta")
    ((_, item),) = parser.split(body)
    assert parser.parse(item).campaign_action == action
    assert meta.CAMPAIGN_ACTIONS[code] == action
