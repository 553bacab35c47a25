"""A reply that lands while its Message 1 is still on the wire.

The provider took Message 1 and the contact answered; the reply's webhook is
processed while our request still waits for the provider's answer (the row
is `sending`, so the reply leaves it to the worker). Then the answer never
comes in time: the row becomes `unconfirmed`. The reply that proves
Message 1 arrived was already spent, so nothing confirmed the row: once
`provider.confirm_window_s` ran out, "resend" sent Message 1 a second time
to a contact who had answered it (and "fail" failed it, which `campaign
retry-failed` would then re-send).

Real parts: the send path (`Tasks`) on SQLite and on PostgreSQL + Redis,
against the fake Wassenger server on loopback (it takes a request whole
even when it answers after our timeout, and drops no repeated reference);
the reply goes through the real webhook ingest. Judged by what the phone
shows (the fake's per-phone counts) and what `campaign show` says.
"""

from __future__ import annotations

import threading

import pytest

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.event_helpers import Events
from tests.event_helpers import wassenger_reply
from tests.helpers import wait_for
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(90)

T0 = utcnow().replace(microsecond=0)
WINDOW_S = 60.0
# Our request gives up after TIMEOUT_S; the fake answers after LATENCY_MS,
# having taken the message as soon as it had the request whole.
TIMEOUT_S = 2.0
LATENCY_MS = 4000


@pytest.fixture
def fake_options() -> FakeOptions:
    return FakeOptions(ack_delays_ms=())


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline_for(request, make_config, fake):
    built = []

    def build(policy: str, timeout_s: float = TIMEOUT_S):
        extra = {
            "provider": {
                "base_url": fake.url,
                "timeout_s": timeout_s,
                "confirm_window_s": WINDOW_S,
                "unconfirmed": policy,
            }
        }
        cfg = mode_config(request, make_config, request.param, extra)
        pipeline = build_pipeline(cfg, ManualClock(T0))
        built.append(pipeline)
        return pipeline

    yield build
    for pipeline in built:
        pipeline.close()


def reply_while_on_the_wire(pipeline, fake, message_id: int, phone: str) -> str:
    """Deliver Message 1 with an answer slower than our timeout; as soon as
    the provider has it (and while our request still waits), the contact's
    reply is stored and processed. The send's outcome."""
    events = Events(pipeline.tasks, clock=pipeline.tasks.clock)
    seen: dict = {}

    def contact_replies():
        try:
            wait_for(lambda: phone_shows(fake, phone)["m1"] == 1, 10, what="m1")
            seen["status"] = Message.get_by_id(message_id).status
            seen["outcome"] = events.apply("wassenger", wassenger_reply(phone, "Oui"))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            seen["error"] = exc

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
    assert seen["status"] == "sending", seen
    assert seen["outcome"] == ["reply: message_2_queued"], seen
    return outcome


@pytest.mark.parametrize("policy", ["resend", "fail"])
def test_a_reply_while_message_1_is_on_the_wire_confirms_it(pipeline_for, fake, policy):
    pipeline = pipeline_for(policy)
    (contact_id,) = seed_contacts(1)
    phone = Contact.get_by_id(contact_id).phone
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)

    outcome = reply_while_on_the_wire(pipeline, fake, message_id, phone)
    assert outcome.startswith("unconfirmed:"), outcome

    (message2,) = Message.select().where(Message.kind == 2)
    assert pipeline.tasks.deliver(message2.id) == "sent"
    clock = pipeline.tasks.clock
    clock.advance(WINDOW_S + 1)
    pipeline.tasks.sweep_once(now=clock())
    # Whatever the sweep queued would be sent by a worker: here, by hand.
    pipeline.tasks.deliver(message_id)
    clock.advance(WINDOW_S * 10)
    pipeline.tasks.sweep_once(now=clock())
    pipeline.tasks.deliver(message_id)

    # What the phone shows: Message 1 once, and Message 2 once.
    wait_for(lambda: phone_shows(fake, phone)["m2"] == 1, 5, what="m2")
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 1}
    # What the operator sees: Message 1 sent (the reply was the evidence),
    # nothing re-sent or failed for want of it, and the campaign complete.
    summary = campaigns.campaign_summary(campaign.id)
    assert summary["unconfirmed"] == {"waiting": 0, "resent": 0, "failed": 0}
    assert Message.get_by_id(message_id).status == "sent"
    assert campaigns.get_campaign(campaign.id).status == "completed"
    # And `campaign retry-failed` has nothing to send again.
    assert campaigns.retry_failed(campaign.id, pipeline.tasks) == 0


def test_a_reply_while_message_1_is_on_the_wire_then_a_500_is_not_retried(
    pipeline_for, fake
):
    """The provider takes Message 1, the contact answers, then the provider
    answers 500 (a gateway error after it forwarded the message). Before: the
    row was queued for a retry, and the retry was a second Message 1."""
    # Our timeout above the fake's latency: the answer is the 500.
    pipeline = pipeline_for("fail", timeout_s=LATENCY_MS / 1000 * 2)
    (contact_id,) = seed_contacts(1)
    phone = Contact.get_by_id(contact_id).phone
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    fake.configure(fail_after_accept_rate=1.0)

    outcome = reply_while_on_the_wire(pipeline, fake, message_id, phone)
    fake.configure(fail_after_accept_rate=0.0)

    assert outcome == "sent: the contact replied"
    row = Message.get_by_id(message_id)
    assert (row.status, row.next_attempt_at) == ("sent", None)
    (message2,) = Message.select().where(Message.kind == 2)
    assert pipeline.tasks.deliver(message2.id) == "sent"
    # Nothing left to send again, by any path.
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    assert campaigns.retry_failed(campaign.id, pipeline.tasks) == 0
    wait_for(lambda: phone_shows(fake, phone)["m2"] == 1, 5, what="m2")
    assert phone_shows(fake, phone) == {"m1": 1, "m2": 1}
    assert campaigns.get_campaign(campaign.id).status == "completed"
