"""A delivery status that confirms an unconfirmed Message 1 (the provider's
answer to our send was lost: a timeout) stores the provider's message id it
carries on the row, as an answered send stores the answer's: the message
list shows it, and a later event naming only that id finds the row. Before,
the row was `sent` with no provider id at all.

What each status carries: Meta's, the wamid (the send's answer has the same
one, stored as both ids); Wassenger's, its `data.id`, which the parser takes
for the WhatsApp id (`waId`; providers.md B.3) and gives as both ids, where
an answered send stores Wassenger's own id and the `waId`.

Real parts: the send path (`Tasks.deliver`) on SQLite and on PostgreSQL +
Redis, against the fake provider on loopback in both dialects, answering
after our timeout (it takes the message all the same); its status webhook,
as the fake posts it, through the real ingest and `Tasks.process_event`.
"""

from __future__ import annotations

import json

import pytest

from daemon.domain import campaigns
from daemon.providers import webhook_parser
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.store.models import Message
from tests.event_helpers import Events
from tests.event_helpers import meta_reply
from tests.event_helpers import wassenger_reply
from tests.helpers import FAST_ACKS
from tests.helpers import Receiver
from tests.helpers import wait_for
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

TOKEN = "meta-token"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(params=["wassenger", "meta"])
def dialect(request) -> str:
    return request.param


@pytest.fixture
def fake(dialect, receiver):
    options = FakeOptions(
        dialect=dialect,
        token=TOKEN if dialect == "meta" else "",
        webhook_url=receiver.url,
        ack_delays_ms=FAST_ACKS,
    )
    with FakeProvider(options) as server:
        yield server


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline(request, make_config, fake, dialect):
    provider = {"base_url": fake.url, "timeout_s": 0.3}
    if dialect == "meta":
        provider |= {
            "kind": "meta",
            "token": TOKEN,
            "phone_number_id": fake.options.phone_number_id,
            "template_name": "intro",
        }
    cfg = mode_config(request, make_config, request.param, {"provider": provider})
    built = build_pipeline(cfg)
    yield built
    built.close()


def posted_status(receiver: Receiver, dialect: str, word: str) -> dict:
    """The webhook body the fake posted for the status `word`."""
    parser = webhook_parser(dialect)

    def find():
        for _, raw in list(receiver.raw):
            body = json.loads(raw)
            events = [parser.parse(item) for _, item in parser.split(body)]
            if [getattr(e, "status", None) for e in events] == [word]:
                return body
        return None

    return wait_for(find, 10, what=f"the {word} status webhook")


def unconfirmed_send(pipeline, fake, dialect) -> tuple[int, str, str]:
    """Message 1 sent, its answer after our timeout: (row id, the id its
    statuses name, the contact's phone)."""
    (contact_id,) = seed_contacts(1)
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    # The provider answers after our timeout, having taken the message.
    fake.configure(latency_ms=1500)
    try:
        outcome = pipeline.tasks.deliver(message_id)
    finally:
        fake.configure(latency_ms=0)
    assert outcome.startswith("unconfirmed:"), outcome
    row = Message.get_by_id(message_id)
    assert (row.status, row.provider_id, row.wa_id) == ("unconfirmed", None, None)
    (taken,) = fake.messages()
    # The id the status names: Meta's wamid; Wassenger's waId.
    named = taken["id"] if dialect == "meta" else taken["waId"]
    return message_id, named, row.phone


def assert_holds(message_id: int, status: str, named: str) -> None:
    """The row as an answered send's: the id in the list, found by it."""
    row = Message.get_by_id(message_id)
    assert (row.status, row.provider_id, row.wa_id) == (status, named, named)
    assert campaigns.message_dict(row)["provider_id"] == named
    found = campaigns.find_message(provider_id=named)
    assert found is not None and found.id == message_id


def test_a_status_confirming_an_unconfirmed_send_stores_the_providers_id(
    pipeline, fake, receiver, dialect
):
    message_id, named, _ = unconfirmed_send(pipeline, fake, dialect)

    body = posted_status(receiver, dialect, "sent")
    outcomes = Events(pipeline.tasks).apply(dialect, body)

    assert outcomes == ["status sent: applied"]
    assert_holds(message_id, "sent", named)


def test_a_status_after_a_reply_confirmed_the_send_stores_the_providers_id(
    pipeline, fake, receiver, dialect
):
    """The reply confirmed the row first (it carries no id of Message 1)."""
    message_id, named, phone = unconfirmed_send(pipeline, fake, dialect)
    events = Events(pipeline.tasks)
    reply = wassenger_reply(phone, "Oui") if dialect == "wassenger" else None
    reply = reply or meta_reply(phone, "Oui")
    assert events.apply(dialect, reply) == ["reply: message_2_queued"]
    assert Message.get_by_id(message_id).status == "sent"

    outcomes = events.apply(dialect, posted_status(receiver, dialect, "sent"))

    assert outcomes == ["status sent: no change"]
    assert_holds(message_id, "sent", named)
