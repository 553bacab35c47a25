"""Campaign lifecycle and the send state machine, on a real database.

Start (fan-out), pause, resume, cancel, completion and retry-failed, as a user
of the CLI or API sees them: rows, member states, queue entries and what the
(fake) provider received.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest

from daemon.domain import campaigns
from daemon.domain.campaigns import lifecycle
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.send_helpers import build_pipeline
from tests.send_helpers import close_db
from tests.send_helpers import member_counts
from tests.send_helpers import message_counts
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import open_db
from tests.send_helpers import phone_for
from tests.send_helpers import seed_contacts

KEYWORDS = ["STOP"]


@pytest.fixture
def pipeline(make_config, fake):
    cfg = make_config(
        "sqlite",
        {"provider": {"base_url": fake.url}, "retry": {"max_attempts": 1}},
    )
    built = build_pipeline(cfg)
    yield built
    built.close()


def started(pipeline, count: int, **kwargs):
    """A started campaign whose fan-out ran; (campaign, Message 1 ids)."""
    campaign = new_campaign(seed_contacts(count), **kwargs)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    pipeline.tasks.fan_out(campaign.id)
    return campaign, message_ids(campaign)


def message_ids(campaign, kind: int = 1) -> list[int]:
    query = Message.select(Message.id).where(
        Message.campaign == campaign.id, Message.kind == kind
    )
    return sorted(m.id for m in query)


def status_of(campaign) -> str:
    return campaigns.get_campaign(campaign.id).status


def reply(phone: str, body: str = "oui", **kwargs):
    return campaigns.handle_reply(
        phone, body, is_group=False, window_h=24, opt_out_keywords=KEYWORDS, **kwargs
    )


# ---------------------------------------------------------------- creation


def test_missing_template_variable_is_refused_naming_it(pipeline):
    with_city = seed_contacts(2)
    without = Contact.create(phone=phone_for(99), name="Zoé", variables={})
    with pytest.raises(InputError) as err:
        campaigns.create_campaign(
            "c", "Bonjour {name} de {city}", "Merci", [*with_city, without.id]
        )
    assert "{city}" in str(err.value) and phone_for(99) in str(err.value)
    # Nothing half-created.
    assert campaigns.list_campaigns() == []


@pytest.mark.parametrize(
    ("message1", "message2", "words"),
    [
        ("Bonjour {name", "ok", ["invalid template"]),
        ("Bonjour {0}", "ok", ["{0}"]),
        ("Bonjour {name!r}", "ok", ["{name}", "format"]),
        ("Bonjour", "Merci {prenom}", ["{prenom}"]),
        ("  ", "ok", ["message1", "empty"]),
        ("x" * 4097, "ok", ["message1", "4096"]),
    ],
)
def test_bad_templates_are_refused(pipeline, message1, message2, words):
    ids = seed_contacts(1)
    with pytest.raises(InputError) as err:
        campaigns.create_campaign("c", message1, message2, ids)
    assert all(w in str(err.value) for w in words), err.value


def test_unknown_contact_is_refused(pipeline):
    with pytest.raises(NotFoundError, match="contact 999999"):
        campaigns.create_campaign("c", "hi", "ok", [*seed_contacts(1), 999999])


def test_builtin_and_contact_variables_are_rendered(pipeline):
    campaign, (message_id,) = started(pipeline, 1)
    message = Message.get_by_id(message_id)
    assert message.body == "Bonjour Contact 0 de Lyon"
    assert message.idempotency_key == f"cd-{campaign.id}-{message.contact_id}-m1"


# ---------------------------------------------------------------- fan-out


def test_start_fans_out_one_message_1_per_member(pipeline):
    campaign = new_campaign(seed_contacts(7))
    assert message_ids(campaign) == []
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    assert status_of(campaign) == "running"
    # The fan-out runs on the messages queue.
    assert pipeline.queues.messages.pending_count() == 1
    assert pipeline.tasks.fan_out(campaign.id) == 7
    assert pipeline.tasks.fan_out(campaign.id) == 0
    assert message_counts(campaign.id) == {"queued": 7}
    # 1 fan-out task + one send task per chunk of 8 messages.
    assert pipeline.queues.messages.pending_count() == 2
    pending = pipeline.queues.messages.pending()
    (chunk,) = [t.args[0] for t in pending if t.name == "send_messages"]
    assert sorted(chunk) == message_ids(campaign)
    with pytest.raises(StateError, match="it is running"):
        campaigns.start_campaign(campaign.id, pipeline.tasks)


def test_fan_out_in_small_batches_covers_everyone(pipeline):
    campaign = new_campaign(seed_contacts(23))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    batches = []
    while ids := campaigns.fan_out(campaign.id, batch_size=5):
        batches.append(len(ids))
    assert batches == [5, 5, 5, 5, 3]
    assert message_counts(campaign.id) == {"queued": 23}


@pytest.mark.parametrize("mode", ["sqlite", "pgqueue"])
@pytest.mark.timeout(60)
def test_concurrent_fan_outs_create_each_message_once(request, make_config, mode):
    db = open_db(mode_config(request, make_config, mode))
    try:
        campaign = new_campaign(seed_contacts(120))
        lifecycle._set_status(campaign.id, ("draft",), "running")
        returned: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(4)

        def fan_out() -> None:
            barrier.wait()
            try:
                while ids := campaigns.fan_out(campaign.id, batch_size=7):
                    with lock:
                        returned.extend(ids)
            finally:
                database.close()

        threads = [threading.Thread(target=fan_out) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(45)
        # Each id is handed out (hence enqueued) once, and every member has one.
        assert len(returned) == len(set(returned)) == 120
        assert sorted(returned) == message_ids(campaign)
    finally:
        close_db(db)


def test_opted_out_and_invalid_contacts_get_nothing(pipeline, fake):
    ids = seed_contacts(5)
    before = Contact.get_by_id(ids[0])
    campaigns.opt_out_contact(before, "asked")
    campaign = new_campaign(ids)
    # Opted out after the campaign was created, before the fan-out.
    campaigns.opt_out_contact(Contact.get_by_id(ids[1]), "asked later")
    Contact.update(wa_status=WaStatus.INVALID).where(Contact.id == ids[2]).execute()
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    pipeline.tasks.fan_out(campaign.id)
    for message_id in message_ids(campaign):
        assert pipeline.tasks.deliver(message_id) == "sent"

    assert member_counts(campaign.id) == {
        MemberState.OPTED_OUT: 2,
        MemberState.SKIPPED: 1,
        MemberState.MESSAGE_1_SENT: 2,
    }
    sent_to = {m["phone"] for m in fake.messages()}
    assert sent_to == {phone_for(3), phone_for(4)}


def test_invalid_numbers_are_sent_when_the_campaign_keeps_them(pipeline):
    ids = seed_contacts(2)
    Contact.update(wa_status=WaStatus.INVALID).where(Contact.id == ids[0]).execute()
    campaign = new_campaign(ids, skip_invalid=False)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    assert pipeline.tasks.fan_out(campaign.id) == 2


def test_opt_out_cancels_queued_messages(pipeline):
    campaign, ids = started(pipeline, 2)
    contact = Contact.get_by_id(Message.get_by_id(ids[0]).contact_id)
    assert reply(contact.phone, "stop !").outcome == "opted_out"
    assert Message.get_by_id(ids[0]).status == "cancelled"
    assert pipeline.tasks.deliver(ids[0]) == "not claimable"
    assert Contact.get_by_id(contact.id).opted_out_at is not None
    # And from later campaigns too.
    later = new_campaign([contact.id], name="later")
    members = CampaignContact.select().where(CampaignContact.campaign == later.id)
    states = {m.state for m in members}
    assert states == {MemberState.OPTED_OUT}


# ---------------------------------------------------------------- pause / resume


def test_pause_stops_new_sends_and_resume_brings_them_back(pipeline, fake):
    campaign, ids = started(pipeline, 3)
    assert pipeline.tasks.deliver(ids[0]) == "sent"
    campaigns.pause_campaign(campaign.id, "lunch")
    assert status_of(campaign) == "paused"
    # The queued tasks still run, but claim nothing.
    assert [pipeline.tasks.deliver(i) for i in ids[1:]] == ["not claimable"] * 2
    assert campaigns.claim(ids[1], "me:1", 60) is None
    assert fake.stats()["requests"] == 1
    with pytest.raises(StateError, match="it is paused"):
        campaigns.pause_campaign(campaign.id)

    queue = pipeline.queues.messages
    queue.flush()
    campaigns.resume_campaign(campaign.id, pipeline.tasks)
    assert status_of(campaign) == "running"
    # The two sends lost while paused are queued again (+ a fan-out).
    pending = [t.args for t in queue.pending() if t.name == "send_single_message"]
    assert sorted(pending) == [(i,) for i in ids[1:]]
    assert [pipeline.tasks.deliver(i) for i in ids[1:]] == ["sent"] * 2
    assert fake.stats()["sends_accepted"] == 3


def test_cancel_cancels_queued_rows(pipeline, fake):
    campaign, ids = started(pipeline, 3)
    assert pipeline.tasks.deliver(ids[0]) == "sent"
    campaigns.cancel_campaign(campaign.id)
    assert status_of(campaign) == "cancelled"
    assert message_counts(campaign.id) == {"sent": 1, "cancelled": 2}
    assert pipeline.tasks.deliver(ids[1]) == "not claimable"
    assert fake.stats()["requests"] == 1
    for action in (campaigns.cancel_campaign, campaigns.pause_campaign):
        with pytest.raises(StateError, match="it is cancelled"):
            action(campaign.id)
    with pytest.raises(StateError):
        campaigns.resume_campaign(campaign.id, pipeline.tasks)


def test_draft_can_be_cancelled_but_not_paused(pipeline):
    campaign = new_campaign(seed_contacts(1))
    with pytest.raises(StateError, match="it is draft"):
        campaigns.pause_campaign(campaign.id)
    campaigns.cancel_campaign(campaign.id)
    with pytest.raises(StateError):
        campaigns.start_campaign(campaign.id, pipeline.tasks)


def test_unknown_campaign_is_not_found(pipeline):
    with pytest.raises(NotFoundError, match="campaign 4242"):
        campaigns.pause_campaign(4242)


# ---------------------------------------------------------------- completion


def test_completes_when_every_member_replied_or_expired(pipeline, fake):
    campaign, ids = started(pipeline, 4)
    assert [pipeline.tasks.deliver(i) for i in ids] == ["sent"] * 4
    assert member_counts(campaign.id) == {MemberState.MESSAGE_1_SENT: 4}
    assert status_of(campaign) == "running"

    phones = [Message.get_by_id(i).phone for i in ids]
    message2 = []
    for phone in phones[:2]:
        outcome = reply(phone)
        assert outcome.outcome == "message_2_queued"
        message2.append(outcome.message2_id)
    # A second reply sends no second Message 2.
    assert reply(phones[0], "encore").message2_id is None
    assert len(message_ids(campaign, kind=2)) == 2
    assert [pipeline.tasks.deliver(i) for i in message2] == ["sent"] * 2
    assert status_of(campaign) == "running"

    assert campaigns.expire_interactions(24, now=utcnow() + dt.timedelta(hours=23)) == 0
    assert campaigns.expire_interactions(24, now=utcnow() + dt.timedelta(hours=25)) == 2
    assert member_counts(campaign.id) == {
        MemberState.MESSAGE_2_SENT: 2,
        MemberState.EXPIRED: 2,
    }
    done = campaigns.get_campaign(campaign.id)
    assert done.status == "completed" and done.finished_at is not None
    assert message_counts(campaign.id, kind=2) == {"sent": 2}
    assert fake.stats()["sends_accepted"] == 6


def test_not_complete_while_a_message_2_is_queued(pipeline):
    campaign, ids = started(pipeline, 1)
    pipeline.tasks.deliver(ids[0])
    outcome = reply(Message.get_by_id(ids[0]).phone)
    assert not campaigns.maybe_complete(campaign.id)
    pipeline.tasks.deliver(outcome.message2_id)
    assert status_of(campaign) == "completed"


def test_retry_failed_requeues_and_reopens_the_campaign(pipeline, fake):
    campaign, ids = started(pipeline, 3)
    fake.configure(fail_rate=1.0)
    # retry.max_attempts = 1: one 500 and the message has failed.
    assert [pipeline.tasks.deliver(i) for i in ids] == ["failed"] * 3
    assert member_counts(campaign.id) == {MemberState.FAILED: 3}
    assert status_of(campaign) == "completed"

    pipeline.queues.messages.flush()
    fake.configure(fail_rate=0.0)
    assert campaigns.retry_failed(campaign.id, pipeline.tasks) == 3
    assert status_of(campaign) == "running"
    assert member_counts(campaign.id) == {MemberState.PENDING: 3}
    for message in Message.select().where(Message.campaign == campaign.id):
        assert (message.status, message.attempts, message.failures) == (
            "queued",
            0,
            0,
        )
        assert message.error is None
    queued = sorted(t.args for t in pipeline.queues.messages.pending())
    assert queued == [(i,) for i in ids]
    assert [pipeline.tasks.deliver(i) for i in ids] == ["sent"] * 3
    assert campaigns.retry_failed(campaign.id, pipeline.tasks) == 0


# ---------------------------------------------------------------- claims


def test_an_expired_lease_makes_the_row_unconfirmed_not_claimable(pipeline):
    # Nobody saw its worker die: the request may have left, so the row is not
    # sent again on the lease's expiry; the sweeper marks it unconfirmed.
    _, (message_id,) = started(pipeline, 1)
    now = utcnow()
    first = campaigns.claim(message_id, "a:1:x", 120, now)
    assert first is not None and first.attempts == 1
    late = now + dt.timedelta(seconds=121)
    assert campaigns.claim(message_id, "b:2:y", 120, late) is None
    assert campaigns.sweep(late, include_queued=True).messages == []
    row = Message.get_by_id(message_id)
    assert row.status == "unconfirmed" and row.unconfirmed_at == late
    assert row.lease_owner is None
    # The first owner comes back late: the row is no longer its own.
    campaigns.record_sent(first, "a:1:x", "late", None)
    assert Message.get_by_id(message_id).status == "unconfirmed"


def test_released_leases_are_claimable_at_once(pipeline):
    _, ids = started(pipeline, 3)
    for message_id in ids[:2]:
        assert campaigns.claim(message_id, "dead:9:a1", 3600)
    assert campaigns.claim(ids[2], "dead:99:b2", 3600)
    assert campaigns.claim(ids[0], "new:7:c3", 3600) is None
    assert campaigns.release_leases(campaigns.process_key("dead", 9)) == 2
    assert campaigns.claim(ids[0], "new:7", 3600) is not None
    assert campaigns.claim(ids[2], "new:7", 3600) is None


def test_a_row_due_later_is_not_claimable(pipeline):
    _, (message_id,) = started(pipeline, 1)
    later = utcnow() + dt.timedelta(seconds=30)
    Message.update(next_attempt_at=later).where(Message.id == message_id).execute()
    assert campaigns.claim(message_id, "me:1", 60) is None
    assert campaigns.claim(message_id, "me:1", 60, now=later) is not None


def test_transitions_are_logged_for_the_operator(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="daemon.domain.campaigns.lifecycle")
    campaign, ids = started(pipeline, 1)
    campaigns.pause_campaign(campaign.id, "lunch")
    with pytest.raises(StateError) as refused:
        campaigns.start_campaign(campaign.id, pipeline.tasks)
    assert str(refused.value) == (
        f"cannot start campaign {campaign.id}: it is paused"
        " (resume it: campaign resume)"
    )
    campaigns.resume_campaign(campaign.id, pipeline.tasks)
    assert pipeline.tasks.deliver(ids[0]) == "sent"
    Message.update(status="read").where(Message.id == ids[0]).execute()
    CampaignContact.update(state="expired").where(
        CampaignContact.campaign == campaign.id
    ).execute()
    assert campaigns.maybe_complete(campaign.id)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "daemon.domain.campaigns.lifecycle"
    ]
    assert lines == [
        f"campaign {campaign.id} started",
        f"campaign {campaign.id} paused: lunch",
        f"campaign {campaign.id} resumed",
        f"campaign {campaign.id} completed",
    ]
    assert all(
        r.levelno == logging.INFO
        for r in caplog.records
        if r.name == "daemon.domain.campaigns.lifecycle"
    )
