"""Status webhooks applied to real rows, through the real processing path.

Each test sends Message 1 for real (Tasks.deliver against the fake Wassenger
provider or a loopback Graph API stub), ingests a status webhook built from
the captured provider payloads, processes the stored event with
Tasks.process_event, and checks what a user sees: the message status, the
member state, the contact's opt-out, the campaign status and its reason.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.store.models import MemberState
from tests.event_helpers import Events
from tests.event_helpers import GraphStub
from tests.event_helpers import campaign
from tests.event_helpers import contact
from tests.event_helpers import event
from tests.event_helpers import member_id
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.event_helpers import message_of
from tests.event_helpers import meta_provider_config
from tests.event_helpers import meta_status
from tests.event_helpers import snapshot
from tests.event_helpers import unique
from tests.event_helpers import wassenger_failed
from tests.event_helpers import wassenger_status
from tests.event_helpers import without
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

MODES = ["sqlite", "pgqueue"]
PAUSE_CODES = [131048, 132015, 132016]


@pytest.fixture(params=MODES)
def wassenger(request, make_config, fake):
    cfg = mode_config(
        request, make_config, request.param, {"provider": {"base_url": fake.url}}
    )
    pipeline = build_pipeline(cfg)
    pipeline.events = Events(pipeline.tasks)
    yield pipeline
    pipeline.close()


@pytest.fixture
def graph():
    stub = GraphStub()
    yield stub
    stub.close()


@pytest.fixture(params=MODES)
def meta(request, make_config, graph):
    cfg = mode_config(request, make_config, request.param, meta_provider_config(graph))
    pipeline = build_pipeline(cfg)
    pipeline.events = Events(pipeline.tasks)
    yield pipeline
    pipeline.close()


def running(pipeline, count: int, *, sent: int, start: int = 0, name: str = "c"):
    """A running campaign of `count` contacts, Message 1 sent to the first
    `sent` of them; (campaign id, contact ids, Message 1 ids)."""
    contacts = seed_contacts(count, start=start)
    created = new_campaign(contacts, name=name)
    campaigns.start_campaign(created.id, pipeline.tasks)
    pipeline.tasks.fan_out(created.id)
    ids = [message_of(created.id, c).id for c in contacts]
    for message_id in ids[:sent]:
        assert pipeline.tasks.deliver(message_id) == "sent"
    return created.id, contacts, ids


# ---------------------------------------------------------------- forward only


def test_sent_delivered_read_move_forward(wassenger):
    cid, contacts, ids = running(wassenger, 2, sent=1)
    key = message(ids[0]).idempotency_key
    before = snapshot()

    (outcome,) = wassenger.events.apply(
        "wassenger", wassenger_status("delivered", reference=key)
    )
    assert outcome == "status delivered: applied"
    row = message(ids[0])
    assert row.status == "delivered" and row.delivered_at is not None
    assert row.read_at is None

    (outcome,) = wassenger.events.apply(
        "wassenger", wassenger_status("read", reference=key)
    )
    assert outcome == "status read: applied"
    row = message(ids[0])
    assert row.status == "read" and row.read_at is not None
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_1_SENT
    assert campaign(cid).status == "running"
    # The other contact's row and member are untouched.
    assert without(snapshot(), messages=[ids[0]]) == without(before, messages=[ids[0]])


def test_read_then_delivered_stays_read(wassenger):
    cid, contacts, ids = running(wassenger, 1, sent=1)
    key = message(ids[0]).idempotency_key
    wassenger.events.apply("wassenger", wassenger_status("read", reference=key))
    read_at = message(ids[0]).read_at
    assert message(ids[0]).status == "read"

    (event_id,) = wassenger.events.store(
        "wassenger", wassenger_status("delivered", reference=key)
    )
    assert wassenger.tasks.process_event(event_id) == "status delivered: no change"
    row = message(ids[0])
    assert row.status == "read" and row.read_at == read_at
    assert event(event_id).processed_at is not None


def test_sent_after_delivered_stays_delivered(wassenger):
    cid, contacts, ids = running(wassenger, 1, sent=1)
    key = message(ids[0]).idempotency_key
    wassenger.events.apply("wassenger", wassenger_status("delivered", reference=key))
    wassenger.events.apply("wassenger", wassenger_status("sent", reference=key))
    assert message(ids[0]).status == "delivered"


def test_failed_after_delivered_is_ignored(wassenger):
    cid, contacts, ids = running(wassenger, 2, sent=1)
    key = message(ids[0]).idempotency_key
    wassenger.events.apply("wassenger", wassenger_status("delivered", reference=key))

    (outcome,) = wassenger.events.apply("wassenger", wassenger_failed(reference=key))
    assert outcome == "status failed: no change"
    row = message(ids[0])
    assert row.status == "delivered"
    assert row.error is None and row.failed_at is None
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_1_SENT
    assert contact(contacts[0]).opted_out_at is None


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize("match", ["reference", "provider_id", "wa_id", "fake_ack"])
def test_status_is_matched_to_the_right_row(wassenger, match):
    cid, contacts, ids = running(wassenger, 3, sent=3)
    target = message(ids[1])
    assert target.provider_id and target.wa_id  # what the fake answered
    payload = {
        # data.id names nothing of ours: only the reference can match.
        "reference": dict(reference=target.idempotency_key),
        # No reference: data.id is the provider's message id.
        "provider_id": dict(msg_id=target.provider_id),
        # No reference, data.id unknown: data.waId is the WhatsApp id.
        "wa_id": dict(wa_id=target.wa_id),
        # What the fake provider posts itself: data.id is the WhatsApp id.
        "fake_ack": dict(msg_id=target.wa_id),
    }[match]
    before = snapshot()
    (outcome,) = wassenger.events.apply(
        "wassenger", wassenger_status("delivered", **payload)
    )
    assert outcome == "status delivered: applied"
    assert message(ids[1]).status == "delivered"
    assert without(snapshot(), messages=[ids[1]]) == without(before, messages=[ids[1]])


def test_status_of_an_unknown_message_changes_nothing(wassenger):
    running(wassenger, 2, sent=2)
    before = snapshot()
    payload = wassenger_status("read", reference="cd-999-999-m1", wa_id=unique("X"))
    (event_id,) = wassenger.events.store("wassenger", payload)
    assert wassenger.tasks.process_event(event_id) == "status: unknown message"
    assert snapshot() == before
    assert event(event_id).processed_at is not None


@pytest.mark.parametrize("by", ["wamid", "reference"])
def test_meta_statuses_move_the_row_forward(meta, by):
    cid, contacts, ids = running(meta, 2, sent=1)
    row = message(ids[0])
    assert row.provider_id.startswith("wamid.STUB") and row.wa_id == row.provider_id
    if by == "wamid":
        ident = dict(wamid=row.wa_id)
    else:
        ident = dict(wamid=unique("wamid.OTHER"), reference=row.idempotency_key)

    meta.events.apply("meta", meta_status("read", **ident))
    meta.events.apply("meta", meta_status("delivered", **ident))
    (outcome,) = meta.events.apply(
        "meta", meta_status("failed", error_code=131026, **ident)
    )
    assert outcome == "status failed: no change"
    row = message(ids[0])
    assert row.status == "read" and row.delivered_at and row.read_at
    assert row.error is None
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_1_SENT


# ---------------------------------------------------------------- Meta codes


@pytest.mark.parametrize("code", [131050, "131050"])
def test_meta_131050_in_a_status_opts_the_contact_out(meta, code):
    cid, contacts, ids = running(meta, 3, sent=2)
    # The same contacts in a second running campaign, Message 1 still queued.
    other = new_campaign(contacts, name="other")
    campaigns.start_campaign(other.id, meta.tasks)
    meta.tasks.fan_out(other.id)
    queued = message_of(other.id, contacts[0])
    assert queued.status == "queued"
    before = snapshot()

    row = message(ids[0])
    meta.events.apply("meta", meta_status("failed", row.wa_id, error_code=code))

    assert contact(contacts[0]).opted_out_at is not None
    assert message(ids[0]).status == "failed"
    assert member_state(cid, contacts[0]) == MemberState.OPTED_OUT
    assert member_state(other.id, contacts[0]) == MemberState.OPTED_OUT
    assert message(queued.id).status == "cancelled"
    # Nobody else is touched, and neither campaign pauses or ends.
    changed = {
        "messages": [ids[0], queued.id],
        "members": [member_id(cid, contacts[0]), member_id(other.id, contacts[0])],
        "contacts": [contacts[0]],
    }
    assert without(snapshot(), **changed) == without(before, **changed)
    assert campaign(cid).status == campaign(other.id).status == "running"


@pytest.mark.parametrize("code", PAUSE_CODES)
def test_meta_pause_code_in_a_status_pauses_the_campaign(meta, code):
    cid, contacts, ids = running(meta, 3, sent=1)
    row = message(ids[0])
    (event_id,) = meta.events.store(
        "meta", meta_status("failed", row.wa_id, error_code=code)
    )
    meta.tasks.process_event(event_id)

    paused = campaign(cid)
    assert paused.status == "paused", (code, paused.status, event(event_id).result)
    assert str(code) in paused.status_reason
    assert message(ids[0]).status == "failed"
    # The other members keep their rows: they go out on resume.
    assert [message(i).status for i in ids[1:]] == ["queued", "queued"]
    assert contact(contacts[0]).opted_out_at is None
    assert event(event_id).processed_at is not None


@pytest.mark.parametrize("code", PAUSE_CODES)
def test_meta_pause_code_on_an_already_paused_campaign(meta, code):
    cid, contacts, ids = running(meta, 3, sent=2)
    campaigns.pause_campaign(cid, "operator: checking the template")
    row = message(ids[0])
    (event_id,) = meta.events.store(
        "meta", meta_status("failed", row.wa_id, error_code=code)
    )
    # Must not raise: the campaign is paused already.
    outcome = meta.tasks.process_event(event_id)
    assert outcome == "status failed: applied"
    assert campaign(cid).status == "paused"
    assert message(ids[0]).status == "failed"
    assert message(ids[1]).status == "sent"
    assert event(event_id).processed_at is not None


def test_meta_other_failure_code_does_not_pause_or_opt_out(meta):
    cid, contacts, ids = running(meta, 2, sent=1)
    row = message(ids[0])
    meta.events.apply("meta", meta_status("failed", row.wa_id, error_code=131026))
    assert message(ids[0]).status == "failed"
    assert campaign(cid).status == "running"
    assert contact(contacts[0]).opted_out_at is None
