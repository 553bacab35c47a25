"""Message 1 on Meta is a template: its body parameters are the variables the
campaign's Message 1 text uses (or the contact's number-named ones), never
every column of the contact. The send path in this process (`Tasks.deliver`,
the real database and Meta client) against the fake provider's Meta
dialect, which, as Meta, refuses a template given the wrong number of
parameters (132000).

Before the fix every Message 1 carried the contact's name, phone and every
variable: a template with fewer placeholders than that failed for everyone.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import Message
from tests.send_helpers import build_pipeline
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

TOKEN = "meta-token"


@pytest.fixture
def fake_options() -> FakeOptions:
    return FakeOptions(
        dialect="meta", token=TOKEN, templates=("intro:2",), ack_delays_ms=()
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


def send_campaign(pipeline, message1: str, variables: dict) -> list[Message]:
    ids = seed_contacts(2, variables=variables)
    campaign = campaigns.create_campaign("meta", message1, "Merci {name} !", ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    message_ids = campaigns.fan_out(campaign.id)
    assert len(message_ids) == 2
    for message_id in message_ids:
        pipeline.tasks.deliver(message_id)
    return [Message.get_by_id(i) for i in message_ids]


def sent_parameters(fake) -> list[list[str]]:
    return [m["template"]["parameters"] for m in fake.messages()]


def test_the_parameters_are_the_variables_message1_uses(pipeline, fake):
    variables = {"city": "Lyon", "zip": "69001", "segment": "b"}
    rows = send_campaign(pipeline, "Bonjour {name} de {city}", variables)
    assert [r.status for r in rows] == ["sent", "sent"], [r.error for r in rows]
    # In the order the text uses them, so "Bonjour {{1}} de {{2}}" reads
    # as the text does (before: alphabetical, "Bonjour Lyon de Contact 0").
    assert sent_parameters(fake) == [["Contact 0", "Lyon"], ["Contact 1", "Lyon"]]
    assert fake.phone_counts() == {
        "+33600000001": {"m1": 1},
        "+33600000011": {"m1": 1},
    }


def test_number_named_variables_feed_the_placeholders_by_number(pipeline, fake):
    variables = {"2": "Paris", "1": "Marie", "city": "Lyon"}
    rows = send_campaign(pipeline, "Bonjour !", variables)
    assert [r.status for r in rows] == ["sent", "sent"], [r.error for r in rows]
    assert sent_parameters(fake) == [["Marie", "Paris"], ["Marie", "Paris"]]
