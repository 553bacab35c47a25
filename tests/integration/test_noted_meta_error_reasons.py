"""A Meta error's reason, as the operator reads it on a failed row (the
message list and `campaign show`'s last failure), names Meta's code once,
with the error's message and details.

Meta's send answers start their message with the code ("(#132000) Number
of parameters ..."), and the reason put "(132000) " in front of that: the
code twice. A failed status webhook's errors[] carry the code apart from
the message, and the row's reason did not name it at all.

Real parts: the send path (`Tasks.deliver`) on SQLite with the Meta client,
against the fake provider's Meta dialect on loopback; its status webhook,
as the fake posts it, through the real ingest and `Tasks.process_event`.
"""

from __future__ import annotations

import json

import pytest

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import Message
from tests.event_helpers import Events
from tests.helpers import FAST_ACKS
from tests.helpers import Receiver
from tests.helpers import wait_for
from tests.send_helpers import build_pipeline
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

TOKEN = "meta-token"


@pytest.fixture
def fake_options() -> FakeOptions:
    # The approved template has one body parameter.
    return FakeOptions(
        dialect="meta", token=TOKEN, templates=("intro:1",), ack_delays_ms=()
    )


@pytest.fixture
def pipeline(make_config, fake):
    cfg = make_config(
        "sqlite",
        {
            "provider": {
                "kind": "meta",
                "base_url": fake.url,
                "token": TOKEN,
                "phone_number_id": fake.options.phone_number_id,
                "template_name": "intro",
            }
        },
    )
    built = build_pipeline(cfg)
    yield built
    built.close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def one_message(pipeline, message1: str):
    (contact_id,) = seed_contacts(1)
    campaign = campaigns.create_campaign("meta", message1, "Merci !", [contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    return campaign.id, message_id


def what_the_operator_reads(campaign_id: int, message_id: int) -> str:
    """The failed row's reason in the message list and in `campaign show`."""
    listed = campaigns.list_messages(campaign_id=campaign_id, status="failed")
    assert [campaigns.message_dict(m)["id"] for m in listed] == [message_id]
    reason = campaigns.message_dict(listed[0])["error"]
    last = campaigns.sending_details(campaign_id)["last_failure"]
    assert last is not None and last["error"] == reason
    return reason


def test_a_refused_send_names_metas_code_once(pipeline, fake):
    # Two variables for a template of one parameter: Meta answers 132000.
    campaign_id, message_id = one_message(pipeline, "Bonjour {name} de {city}")

    assert pipeline.tasks.deliver(message_id) == "failed"

    reason = what_the_operator_reads(campaign_id, message_id)
    assert reason.count("132000") == 1, reason
    assert reason == (
        "send: HTTP 400: (132000) Number of parameters does not match the"
        " expected number of params: body: number of localizable_params (2)"
        " does not match the expected number of params (1)"
    )


def test_a_failed_status_names_metas_code_once(pipeline, fake, receiver):
    campaign_id, message_id = one_message(pipeline, "Bonjour {name}")
    fake.configure(
        webhook_url=receiver.url,
        ack_delays_ms=FAST_ACKS,
        status_failure_share=1.0,
        status_failure_code=131026,
    )

    assert pipeline.tasks.deliver(message_id) == "sent"
    wait_for(lambda: receiver.raw, 10, what="the failed status webhook")
    ((_, raw),) = receiver.raw
    outcomes = Events(pipeline.tasks).apply("meta", json.loads(raw))

    assert outcomes == ["status failed: applied"]
    assert Message.get_by_id(message_id).status == "failed"
    reason = what_the_operator_reads(campaign_id, message_id)
    assert reason == "(131026) Message undeliverable", reason
