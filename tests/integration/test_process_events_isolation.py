"""One failing webhook event does not stop the others (Tasks.process_events).

The failure is a real database error: a trigger refuses the interaction row
of one reply ("poison"), so that event's transaction rolls back inside the
real processing path. The batch runs through the Huey task's own function
(call_local: the tracked wrapper the worker runs).
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.store.db import is_postgres
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import database
from tests.event_helpers import Events
from tests.event_helpers import contact
from tests.event_helpers import event
from tests.event_helpers import interactions
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.event_helpers import message_of
from tests.event_helpers import wassenger_reply
from tests.event_helpers import wassenger_status
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

POISON = "poison"

SQLITE_TRIGGER = f"""
CREATE TRIGGER poison_reply BEFORE INSERT ON interaction
WHEN NEW.body = '{POISON}'
BEGIN SELECT RAISE(ABORT, 'poisoned reply refused by the test trigger'); END
"""
PG_TRIGGER = [
    f"""
CREATE FUNCTION poison_reply() RETURNS trigger AS $$
BEGIN
  IF NEW.body = '{POISON}' THEN
    RAISE EXCEPTION 'poisoned reply refused by the test trigger';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql
""",
    """
CREATE TRIGGER poison_reply BEFORE INSERT ON interaction
FOR EACH ROW EXECUTE FUNCTION poison_reply()
""",
]


@pytest.fixture(params=["sqlite", "pgqueue"])
def pipeline(request, make_config, fake):
    cfg = mode_config(
        request, make_config, request.param, {"provider": {"base_url": fake.url}}
    )
    built = build_pipeline(cfg)
    built.events = Events(built.tasks)
    for sql in PG_TRIGGER if is_postgres() else [SQLITE_TRIGGER]:
        database.execute_sql(sql)
    yield built
    built.close()


def running(pipeline, count: int):
    contacts = seed_contacts(count)
    created = new_campaign(contacts)
    campaigns.start_campaign(created.id, pipeline.tasks)
    pipeline.tasks.fan_out(created.id)
    ids = [message_of(created.id, c).id for c in contacts]
    for message_id in ids:
        assert pipeline.tasks.deliver(message_id) == "sent"
    return created.id, contacts, ids


def kind_2(campaign_id: int, contact_id: int) -> Message | None:
    return message_of(campaign_id, contact_id, kind=2)


@pytest.mark.parametrize("bad_at", [0, 1, 3])
def test_a_failing_event_does_not_stop_the_batch(pipeline, bad_at):
    cid, contacts, ids = running(pipeline, 4)
    phones = [message(i).phone for i in ids]
    good = [
        ("wassenger", wassenger_reply(phones[0], "oui")),
        (
            "wassenger",
            wassenger_status("delivered", reference=message(ids[2]).idempotency_key),
        ),
        ("wassenger", wassenger_reply(phones[3], "STOP")),
    ]
    bad = ("wassenger", wassenger_reply(phones[1], POISON))
    batch = good[:bad_at] + [bad] + good[bad_at:]
    event_ids = [pipeline.events.store(p, body)[0] for p, body in batch]
    bad_id = event_ids[bad_at]

    # The worker's task function: it must return, not raise.
    done = pipeline.tasks.process_webhook_events.call_local(event_ids)
    assert done == len(event_ids)

    for event_id in event_ids:
        if event_id != bad_id:
            assert event(event_id).processed_at is not None, event(event_id).result
    # The good events' effects are all there.
    assert member_state(cid, contacts[0]) == MemberState.INTERACTED
    assert kind_2(cid, contacts[0]) is not None
    assert message(ids[2]).status == "delivered"
    assert contact(contacts[3]).opted_out_at is not None
    assert member_state(cid, contacts[3]) == MemberState.OPTED_OUT
    # The failing one changed nothing, stays unprocessed, and says why.
    assert member_state(cid, contacts[1]) == MemberState.MESSAGE_1_SENT
    assert kind_2(cid, contacts[1]) is None
    assert interactions(contacts[1]) == []
    failed = event(bad_id)
    assert failed.processed_at is None
    assert failed.attempts >= 1, "a failed attempt must be counted"
    assert failed.last_error, "the failure must be recorded on the event"


def test_the_failed_event_is_processed_once_the_cause_is_gone(pipeline):
    cid, contacts, ids = running(pipeline, 2)
    phones = [message(i).phone for i in ids]
    bad_id = pipeline.events.store("wassenger", wassenger_reply(phones[1], POISON))[0]
    good_id = pipeline.events.store("wassenger", wassenger_reply(phones[0], "oui"))[0]
    pipeline.tasks.process_webhook_events.call_local([bad_id, good_id])
    assert event(bad_id).processed_at is None
    assert event(good_id).processed_at is not None

    database.execute_sql(
        "DROP TRIGGER poison_reply" + (" ON interaction" if is_postgres() else "")
    )
    pipeline.tasks.process_webhook_events.call_local([bad_id, good_id])

    assert event(bad_id).processed_at is not None
    assert member_state(cid, contacts[1]) == MemberState.INTERACTED
    assert [i.outcome for i in interactions(contacts[1])] == ["message_2"]
    # Processing the good one again changed nothing.
    assert [i.outcome for i in interactions(contacts[0])] == ["message_2"]
