"""A Message 1 recorded sent because its contact replied while the request
was out (`campaigns.replied_meanwhile`: the provider answered an error after
the reply was processed) is counted in campaignd_sends_total{kind="1",
outcome="sent"}, as a send the provider accepted is. Before, the row was
sent and the member message_1_sent, but the counter (the dashboard's send
rate, the contrib rules) never saw it.

Real parts: the send path (`Tasks.deliver`) on SQLite against the fake
Wassenger server on loopback, which answers after a latency (the reply is
processed through the real ingest meanwhile); the counter read from this
process's Prometheus registry, which /metrics serves.
"""

from __future__ import annotations

import threading

import pytest
from prometheus_client import REGISTRY

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import Contact
from daemon.store.models import Message
from tests.event_helpers import Events
from tests.event_helpers import wassenger_reply
from tests.helpers import wait_for
from tests.send_helpers import build_pipeline
from tests.send_helpers import invalid_phone_for
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

LATENCY_MS = 1500


@pytest.fixture
def fake_options() -> FakeOptions:
    return FakeOptions(ack_delays_ms=())


@pytest.fixture
def pipeline(make_config, fake):
    extra = {"provider": {"base_url": fake.url, "timeout_s": 10.0}}
    built = build_pipeline(make_config("sqlite", extra))
    yield built
    built.close()


def sends(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "campaignd_sends_total", {"kind": "1", "outcome": outcome}
    )
    return value or 0.0


def test_a_send_answered_500_after_the_reply_counts_as_sent(pipeline, fake):
    """The provider took Message 1 and answered 500; the reply came first."""
    (contact_id,) = seed_contacts(1)
    phone = Contact.get_by_id(contact_id).phone
    fake.configure(fail_after_accept_rate=1.0)

    def provider_has_it() -> bool:
        return phone_shows(fake, phone)["m1"] == 1

    outcome, counted = send_with_a_reply_meanwhile(
        pipeline, fake, contact_id, phone, provider_has_it
    )

    assert outcome == "sent: the contact replied"
    assert counted == {"sent": 1.0, "retry": 0.0, "failed": 0.0}


def test_a_send_refused_after_the_reply_counts_as_sent(pipeline, fake):
    """Whatever error the provider answers: a permanent one (400) too."""
    (contact_id,) = seed_contacts(1, phone=invalid_phone_for(1))
    phone = Contact.get_by_id(contact_id).phone

    def provider_has_it() -> bool:
        return fake.stats()["invalid_requests"] == 1

    outcome, counted = send_with_a_reply_meanwhile(
        pipeline, fake, contact_id, phone, provider_has_it
    )

    assert outcome == "sent: the contact replied"
    assert counted == {"sent": 1.0, "retry": 0.0, "failed": 0.0}


def send_with_a_reply_meanwhile(pipeline, fake, contact_id, phone, provider_has_it):
    """Deliver the contact's Message 1, answered after LATENCY_MS; once the
    provider has the request (`provider_has_it`), and while ours waits for
    its answer, the contact's reply is stored and processed. The send's
    outcome, and what it added to campaignd_sends_total{kind="1"}."""
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    events = Events(pipeline.tasks)
    seen: dict = {}

    def contact_replies():
        try:
            wait_for(provider_has_it, 10, what="the provider has the request")
            seen["status"] = Message.get_by_id(message_id).status
            seen["outcome"] = events.apply("wassenger", wassenger_reply(phone, "Oui"))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            seen["error"] = exc

    before = {o: sends(o) for o in ("sent", "retry", "failed")}
    fake.configure(latency_ms=LATENCY_MS)
    thread = threading.Thread(target=contact_replies)
    thread.start()
    try:
        outcome = pipeline.tasks.deliver(message_id)
    finally:
        thread.join(15)
        fake.configure(latency_ms=0)
    assert "error" not in seen, seen
    # The case under test: the reply was applied while the row was on the wire.
    assert seen == {"status": "sending", "outcome": ["reply: message_2_queued"]}
    row = Message.get_by_id(message_id)
    assert (row.status, row.next_attempt_at) == ("sent", None)
    return outcome, {o: sends(o) - before[o] for o in before}
