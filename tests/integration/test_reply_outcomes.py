"""Every outcome of a contact's reply, from a real inbound webhook.

Message 1 is sent for real (fake Wassenger provider), the reply is the
captured `message:in:new` (Wassenger) or text message (Meta) payload with the
contact's number, stored by the real ingest and processed by
Tasks.process_event. Checked: the interaction row, the message rows, the
member and the contact.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from daemon.domain import campaigns
from daemon.store.models import CampaignContact
from daemon.store.models import Interaction
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.event_helpers import Events
from tests.event_helpers import campaign
from tests.event_helpers import contact
from tests.event_helpers import event
from tests.event_helpers import interactions
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.event_helpers import message_of
from tests.event_helpers import meta_reply
from tests.event_helpers import snapshot
from tests.event_helpers import wassenger_reply
from tests.event_helpers import wassenger_status
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_for
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

MODES = ["sqlite", "pgqueue"]
PROVIDERS = ["wassenger", "meta"]


def _pipeline(request, make_config, fake, mode):
    cfg = mode_config(request, make_config, mode, {"provider": {"base_url": fake.url}})
    pipeline = build_pipeline(cfg)
    pipeline.events = Events(pipeline.tasks)
    return pipeline


@pytest.fixture
def pipeline(request, make_config, fake):
    built = _pipeline(request, make_config, fake, "sqlite")
    yield built
    built.close()


@pytest.fixture(params=MODES)
def any_db(request, make_config, fake):
    built = _pipeline(request, make_config, fake, request.param)
    yield built
    built.close()


def running(pipeline, count: int, *, sent: int, name: str = "c", start: int = 0):
    contacts = seed_contacts(count, start=start)
    created = new_campaign(contacts, name=name)
    campaigns.start_campaign(created.id, pipeline.tasks)
    pipeline.tasks.fan_out(created.id)
    ids = [message_of(created.id, c).id for c in contacts]
    for message_id in ids[:sent]:
        assert pipeline.tasks.deliver(message_id) == "sent"
    return created.id, contacts, ids


def reply(pipeline, provider: str, phone: str, text: str, **kwargs) -> int:
    """Store and process one reply; its event id."""
    build = wassenger_reply if provider == "wassenger" else meta_reply
    (event_id,) = pipeline.events.store(provider, build(phone, text, **kwargs))
    pipeline.tasks.process_event(event_id)
    assert event(event_id).processed_at is not None
    return event_id


def result(event_id: int) -> str:
    return event(event_id).result


def messages_2(campaign_id: int) -> list[Message]:
    return list(
        Message.select().where(Message.campaign == campaign_id, Message.kind == 2)
    )


def outcomes(contact_id: int) -> list[str]:
    return [i.outcome for i in interactions(contact_id)]


# ---------------------------------------------------------------- message 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reply_in_window_queues_message_2(any_db, provider):
    cid, contacts, ids = running(any_db, 2, sent=2)
    phone = message(ids[0]).phone

    event_id = reply(any_db, provider, phone, "Oui, ça m'intéresse")

    assert result(event_id) == "reply: message_2_queued"
    (second,) = messages_2(cid)
    assert second.contact_id == contacts[0]
    assert second.status == "queued"
    assert second.body == "Merci Contact 0 !"
    assert second.idempotency_key == f"cd-{cid}-{contacts[0]}-m2"
    assert member_state(cid, contacts[0]) == MemberState.INTERACTED
    assert member_state(cid, contacts[1]) == MemberState.MESSAGE_1_SENT
    (row,) = interactions(contacts[0])
    assert row.outcome == "message_2"
    assert row.campaign_id == cid and row.event_id == event_id
    assert row.body == "Oui, ça m'intéresse"
    # Message 2 goes out and the member is done.
    assert any_db.tasks.deliver(second.id) == "sent"
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_2_SENT


def test_message_2_completes_the_campaign_of_its_last_member(pipeline):
    cid, contacts, ids = running(pipeline, 1, sent=1)
    reply(pipeline, "wassenger", message(ids[0]).phone, "oui")
    (second,) = messages_2(cid)
    assert pipeline.tasks.deliver(second.id) == "sent"
    assert campaign(cid).status == "completed"


# ---------------------------------------------------------------- no campaign


def test_reply_before_message_1_was_attempted_is_no_open_campaign(pipeline):
    cid, contacts, ids = running(pipeline, 2, sent=0)
    before = snapshot()

    event_id = reply(pipeline, "wassenger", message(ids[0]).phone, "oui")

    assert result(event_id) == "reply: no_open_campaign"
    (row,) = interactions(contacts[0])
    assert row.outcome == "no_open_campaign" and row.campaign_id is None
    assert messages_2(cid) == []
    assert message(ids[0]).status == "queued"
    assert member_state(cid, contacts[0]) == MemberState.PENDING
    after = snapshot()
    assert after["interactions"] == before["interactions"] + 1
    assert {**after, "interactions": 0} == {**before, "interactions": 0}


def sent_hours_ago(message_id: int, hours: float) -> None:
    """Message 1 (sent for real) went out `hours` ago."""
    when = utcnow() - dt.timedelta(hours=hours)
    row = message(message_id)
    Message.update(sent_at=when, created_at=when).where(
        Message.id == message_id
    ).execute()
    CampaignContact.update(message1_sent_at=when).where(
        CampaignContact.campaign == row.campaign_id,
        CampaignContact.contact == row.contact_id,
    ).execute()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reply_outside_the_window_is_no_open_campaign(pipeline, provider):
    cid, contacts, ids = running(pipeline, 2, sent=2)
    sent_hours_ago(ids[0], 25)

    event_id = reply(pipeline, provider, message(ids[0]).phone, "oui")

    assert result(event_id) == "reply: no_open_campaign"
    assert outcomes(contacts[0]) == ["no_open_campaign"]
    assert messages_2(cid) == []
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_1_SENT


def test_reply_just_inside_the_window_queues_message_2(pipeline):
    cid, contacts, ids = running(pipeline, 1, sent=1)
    sent_hours_ago(ids[0], 23)
    event_id = reply(pipeline, "wassenger", message(ids[0]).phone, "oui")
    assert result(event_id) == "reply: message_2_queued"
    assert len(messages_2(cid)) == 1


def test_reply_goes_to_the_latest_message_1(pipeline):
    """Two campaigns reached the contact: the later Message 1 gets the reply."""
    old_cid, contacts, old_ids = running(pipeline, 1, sent=1, name="old")
    new = new_campaign(contacts, name="new")
    campaigns.start_campaign(new.id, pipeline.tasks)
    pipeline.tasks.fan_out(new.id)
    assert pipeline.tasks.deliver(message_of(new.id, contacts[0]).id) == "sent"

    reply(pipeline, "wassenger", message(old_ids[0]).phone, "oui")

    assert member_state(new.id, contacts[0]) == MemberState.INTERACTED
    assert member_state(old_cid, contacts[0]) == MemberState.MESSAGE_1_SENT
    assert messages_2(old_cid) == [] and len(messages_2(new.id)) == 1


# ---------------------------------------------------------------- opt-out


@pytest.mark.parametrize("text", ["STOP", "stop", "  Arrêt ! ", "désinscrire"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_stop_opts_the_contact_out_everywhere(pipeline, provider, text):
    cid, contacts, ids = running(pipeline, 2, sent=1)
    # The contact is queued in another campaign too.
    other = new_campaign(contacts, name="other")
    campaigns.start_campaign(other.id, pipeline.tasks)
    pipeline.tasks.fan_out(other.id)

    event_id = reply(pipeline, provider, message(ids[0]).phone, text)

    assert result(event_id) == "reply: opted_out"
    assert contact(contacts[0]).opted_out_at is not None
    assert member_state(cid, contacts[0]) == MemberState.OPTED_OUT
    assert member_state(other.id, contacts[0]) == MemberState.OPTED_OUT
    assert message_of(other.id, contacts[0]).status == "cancelled"
    (row,) = interactions(contacts[0])
    assert row.outcome == "opted_out" and row.event_id == event_id
    assert messages_2(cid) == []
    # The other contact is untouched.
    assert contact(contacts[1]).opted_out_at is None
    assert message_of(other.id, contacts[1]).status == "queued"
    assert member_state(cid, contacts[1]) == MemberState.PENDING


def test_stop_inside_a_sentence_is_a_reply(pipeline):
    cid, contacts, ids = running(pipeline, 1, sent=1)
    event_id = reply(pipeline, "wassenger", message(ids[0]).phone, "stop ou encore ?")
    assert result(event_id) == "reply: message_2_queued"
    assert contact(contacts[0]).opted_out_at is None


def test_reply_after_opting_out_is_opted_out_before(pipeline):
    cid, contacts, ids = running(pipeline, 1, sent=1)
    phone = message(ids[0]).phone
    reply(pipeline, "wassenger", phone, "STOP")
    opted_out_at = contact(contacts[0]).opted_out_at

    event_id = reply(pipeline, "wassenger", phone, "en fait oui")

    assert result(event_id) == "reply: opted_out_before"
    assert outcomes(contacts[0]) == ["opted_out", "opted_out_before"]
    assert interactions(contacts[0])[1].campaign_id is None
    assert contact(contacts[0]).opted_out_at == opted_out_at
    assert member_state(cid, contacts[0]) == MemberState.OPTED_OUT
    assert messages_2(cid) == []


@pytest.mark.parametrize(
    ("written_ago_s", "outcome"),
    [
        (2 * 86400, "reply: no_open_campaign"),
        (5 * 60, "reply: message_2_queued"),  # within the clocks' skew
    ],
)
def test_a_message_written_before_message_1_answers_nothing(
    pipeline, written_ago_s, outcome
):
    """Written while our webhook was unreachable, delivered by the provider's
    retries after Message 1 went out: before, it got a Message 2."""
    cid, contacts, ids = running(pipeline, 1, sent=1)
    phone = message(ids[0]).phone
    written = time.time() - written_ago_s

    assert (
        result(reply(pipeline, "wassenger", phone, "Bonjour", written=written))
        == outcome
    )
    assert len(messages_2(cid)) == (outcome == "reply: message_2_queued")
    # A STOP is a STOP, whenever it was written.
    stop = reply(pipeline, "wassenger", phone, "STOP", written=written)
    assert result(stop) == "reply: opted_out"
    assert contact(contacts[0]).opted_out_at is not None


def test_a_late_status_dates_message_1_from_its_attempt(pipeline):
    """Message 1's answer lost (unconfirmed 20 min ago); its status is
    processed only now, behind a backlog, and then the reply the contact
    wrote 19 min ago. The send time is the attempt's, so the reply answers
    it (dated from the status, it would have looked written before it)."""
    cid, contacts, ids = running(pipeline, 1, sent=0)
    row = message(ids[0])
    attempted = utcnow() - dt.timedelta(minutes=20)
    Message.update(status="unconfirmed", unconfirmed_at=attempted).where(
        Message.id == row.id
    ).execute()
    (status_id,) = pipeline.events.store(
        "wassenger", wassenger_status("sent", reference=row.idempotency_key)
    )
    pipeline.tasks.process_event(status_id)
    assert message(ids[0]).status == "sent"
    assert message(ids[0]).sent_at == attempted

    written = time.time() - 19 * 60
    event_id = reply(pipeline, "wassenger", row.phone, "Oui", written=written)
    assert result(event_id) == "reply: message_2_queued"


# The same line as imported (E.164) and as WhatsApp may name the sender.
WHATSAPP_FORMS = [
    ("+525512345678", "+5215512345678"),  # Mexico: WhatsApp keeps the mobile 1
    ("+5491123456789", "+541123456789"),  # Argentina: imported with its 9
    ("+5511987654321", "+551187654321"),  # Brazil: an account older than the 9th digit
    ("+551187654321", "+5511987654321"),
]


@pytest.mark.parametrize(("imported", "sender"), WHATSAPP_FORMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_reply_and_a_stop_from_the_whatsapp_form_of_the_number(
    pipeline, provider, imported, sender
):
    """Before: unknown_contact, so no Message 2, and a STOP that changed
    nothing (the contact kept getting later campaigns)."""
    (cid_contact,) = seed_contacts(1, start=500, phone=imported)
    created = new_campaign([cid_contact], name="mx")
    campaigns.start_campaign(created.id, pipeline.tasks)
    pipeline.tasks.fan_out(created.id)
    assert pipeline.tasks.deliver(message_of(created.id, cid_contact).id) == "sent"

    event_id = reply(pipeline, provider, sender, "Oui")
    assert result(event_id) == "reply: message_2_queued"
    (second,) = messages_2(created.id)
    assert second.contact_id == cid_contact and second.phone == imported

    stop = reply(pipeline, provider, sender, "STOP")
    assert result(stop) == "reply: opted_out"
    assert contact(cid_contact).opted_out_at is not None


def test_the_exact_number_wins_over_its_whatsapp_form(pipeline):
    # Both forms imported, as two contacts: the sender's own is the one.
    mexico, with_one = seed_contacts(1, start=600, phone="+525512345678") + (
        seed_contacts(1, start=601, phone="+5215512345678")
    )
    created = new_campaign([mexico, with_one], name="both")
    campaigns.start_campaign(created.id, pipeline.tasks)
    pipeline.tasks.fan_out(created.id)
    for contact_id in (mexico, with_one):
        assert pipeline.tasks.deliver(message_of(created.id, contact_id).id) == "sent"
    reply(pipeline, "wassenger", "+5215512345678", "Oui")
    assert [m.contact_id for m in messages_2(created.id)] == [with_one]


# ---------------------------------------------------------------- ignored


@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_message_is_ignored(pipeline, provider):
    cid, contacts, ids = running(pipeline, 1, sent=1)
    before = snapshot()
    kwargs = {"group": True} if provider == "wassenger" else {"group_id": "G123"}

    event_id = reply(pipeline, provider, message(ids[0]).phone, "STOP", **kwargs)

    assert result(event_id) == "reply: ignored_group"
    assert interactions(contacts[0]) == []
    assert contact(contacts[0]).opted_out_at is None
    assert snapshot() == before


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reply_from_an_unknown_number(pipeline, provider):
    running(pipeline, 1, sent=1)
    before = snapshot()

    event_id = reply(pipeline, provider, phone_for(999), "STOP")

    assert result(event_id) == "reply: unknown_contact"
    assert Interaction.select().count() == 0
    assert snapshot() == before
