"""Pacing of Message 1 across a pause and a restart: the device's rate holds.

A backlog reserves one pacing slot per message (`pacing.per_minute`): the
rows too far ahead go back to the queue until their own slot
(`message.paced_until`), and come back with it already reserved. When the
campaign is paused, or the daemon is down, those slots pass unused. The
rows kept their slot all the same: resumed (or restarted) hours later, every
one of them came back "with a slot" and skipped the rate, so the whole
backlog went out at once (a device paced at 12 a minute sent dozens in a
second: what gets a WhatsApp number banned).

Real parts: the send path (`Tasks.deliver`) on the real database and
queues, the fake Wassenger server on loopback; time moves through the
injected clock, the pause is the operator's `campaign pause`, the restart
the supervisor's `recovery.release_at_start`.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.app import recovery
from daemon.domain import campaigns
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

# The backlog was built two hours ago.
START = (utcnow() - dt.timedelta(hours=2)).replace(microsecond=0)
PACING = {"pacing": {"per_minute": 12, "daily_cap": 0, "jitter_s": 0.0}}

pipeline = manual_pipeline(START, PACING)


def deliver(pipeline, message_id: int, sent_at: dict) -> str:
    """deliver, noting when the request left (the clock plus the pacer's sleep)."""
    sleeps = len(pipeline.sleeps)
    outcome = pipeline.tasks.deliver(message_id)
    if outcome == "sent":
        waited = sum(pipeline.sleeps[sleeps:])
        sent_at[message_id] = pipeline.clock() + dt.timedelta(seconds=waited)
    return outcome


def backlog_with_reserved_slots(pipeline, count: int = 6):
    """A running campaign whose `count` Message 1s all came at START: two go
    (the 5 s a thread may wait), the others wait for their slot."""
    contact_ids = seed_contacts(count)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    sent_at: dict[int, dt.datetime] = {}
    outcomes = [deliver(pipeline, i, sent_at) for i in ids]
    assert outcomes == ["sent"] * 2 + ["deferred: pacing"] * (count - 2)
    assert all(Message.get_by_id(i).paced_until for i in ids[2:])
    return campaign, ids[2:]


def gaps_s(times) -> list[float]:
    ordered = sorted(times)
    pairs = zip(ordered, ordered[1:], strict=False)
    return [(b - a).total_seconds() for a, b in pairs]


def assert_paced(sent_at: dict, outcomes: list[str]) -> None:
    """12 a minute: 5 s between two requests, and only what fits in a
    thread's 5 s wait goes now, the rest waits for new slots."""
    assert outcomes == ["sent", "sent", "deferred: pacing", "deferred: pacing"]
    assert gaps_s(sent_at.values()) == [5.0]


def test_a_resumed_campaign_does_not_send_its_paced_backlog_at_once(pipeline, fake):
    campaign, waiting = backlog_with_reserved_slots(pipeline)
    # The operator pauses before the slots come; their tasks find the
    # campaign paused and leave the rows queued.
    campaigns.pause_campaign(campaign.id, "lunch")
    for message_id in waiting:
        pipeline.clock.set(Message.get_by_id(message_id).next_attempt_at)
        assert pipeline.tasks.deliver(message_id) == "not claimable"

    # Two hours later the operator resumes: the sends the resume enqueues.
    now = pipeline.clock.set(utcnow().replace(microsecond=0))
    campaigns.resume_campaign(campaign.id, pipeline.tasks)
    due = campaigns.due_message_ids(campaign.id)
    assert sorted(due) == sorted(waiting)
    sent_at: dict[int, dt.datetime] = {}
    outcomes = [deliver(pipeline, i, sent_at) for i in due]

    assert_paced(sent_at, outcomes)
    assert min(sent_at.values()) == now
    assert fake.stats()["sends_accepted"] == 4


def test_a_restart_does_not_send_the_paced_backlog_at_once(pipeline, fake):
    _, waiting = backlog_with_reserved_slots(pipeline)
    # The daemon is stopped before the slots come and started two hours
    # later: the queue's scheduled entries are all due at once.
    now = pipeline.clock.set(utcnow().replace(microsecond=0))
    recovery.release_at_start(pipeline.cfg)
    sent_at: dict[int, dt.datetime] = {}
    outcomes = [deliver(pipeline, i, sent_at) for i in waiting]

    assert_paced(sent_at, outcomes)
    assert min(sent_at.values()) == now
    assert fake.stats()["sends_accepted"] == 4


def test_message_workers_down_while_the_rest_ran_do_not_burst_the_backlog(
    pipeline, fake
):
    """Only worker:messages was down (a crash loop, the host's memory): no
    resume, no restart of the daemon, no sweep of lost entries, so nothing
    forgot the rows' slots. Back two hours later, its queue's entries are
    all due: each row whose slot long passed takes a new one."""
    _, waiting = backlog_with_reserved_slots(pipeline)
    now = pipeline.clock.set(utcnow().replace(microsecond=0))
    sent_at: dict[int, dt.datetime] = {}
    outcomes = [deliver(pipeline, i, sent_at) for i in waiting]

    assert_paced(sent_at, outcomes)
    assert min(sent_at.values()) == now
    assert fake.stats()["sends_accepted"] == 4


@pytest.mark.parametrize("action", ["cancel", "pause"])
def test_a_campaign_stopped_with_a_backlog_leaves_the_device_free(
    pipeline, fake, action
):
    """Campaign A's backlog reserved the device's slots for the next minutes
    (hours at a real size); the operator cancels it (a typo) or pauses it,
    and starts campaign B. B's Message 1 waited behind every slot A had
    reserved and would never use: nothing was sent for as long as A's
    backlog would have taken."""
    campaign_a, waiting = backlog_with_reserved_slots(pipeline, count=40)
    last_slot = max(Message.get_by_id(i).next_attempt_at for i in waiting)
    assert last_slot - START > dt.timedelta(minutes=3)
    if action == "cancel":
        campaigns.cancel_campaign(campaign_a.id)
    else:
        campaigns.pause_campaign(campaign_a.id, "urgent campaign first")

    pipeline.clock.advance(10)
    (contact_b,) = seed_contacts(1, start=100)
    campaign_b = new_campaign([contact_b], name="B")
    campaigns.start_campaign(campaign_b.id, pipeline.tasks)
    (message_b,) = campaigns.fan_out(campaign_b.id)
    sent_at: dict[int, dt.datetime] = {}

    # B goes within the 5 s a thread may wait, not minutes later.
    assert deliver(pipeline, message_b, sent_at) == "sent"
    assert sent_at[message_b] - pipeline.clock() <= dt.timedelta(seconds=10)


def test_the_slots_another_campaign_holds_are_kept(pipeline, fake):
    """Only what the stopped campaign held is given up: a newcomer still
    queues behind the slots a running campaign's rows wait for."""
    _, b_waiting = backlog_with_reserved_slots(pipeline)
    b_slots = [Message.get_by_id(i).next_attempt_at for i in b_waiting]
    contact_ids = seed_contacts(4, start=50)
    campaign_a = new_campaign(contact_ids, name="A")
    campaigns.start_campaign(campaign_a.id, pipeline.tasks)
    a_ids = campaigns.fan_out(campaign_a.id)
    assert [pipeline.tasks.deliver(i) for i in a_ids] == ["deferred: pacing"] * 4
    campaigns.cancel_campaign(campaign_a.id)

    (contact_c,) = seed_contacts(1, start=100)
    campaign_c = new_campaign([contact_c], name="C")
    campaigns.start_campaign(campaign_c.id, pipeline.tasks)
    (message_c,) = campaigns.fan_out(campaign_c.id)

    assert pipeline.tasks.deliver(message_c) == "deferred: pacing"
    # Right after B's last slot, not after A's cancelled ones.
    assert Message.get_by_id(message_c).next_attempt_at == max(b_slots) + dt.timedelta(
        seconds=5
    )


def test_a_paced_backlog_whose_queue_entries_were_lost_is_paced_again(pipeline, fake):
    """Redis restarted empty (or a SQLite queue file lost) while a paced
    backlog waited for its slots: the sweeper finds the rows once their
    slot has passed and enqueues them together; each still carried its
    slot, so all went at once."""
    _, waiting = backlog_with_reserved_slots(pipeline)
    # Given back for their slots at START (release dates it by the wall clock).
    Message.update(enqueued_at=START).where(Message.id.in_(waiting)).execute()
    pipeline.queues.messages.flush()
    now = pipeline.clock.set(utcnow().replace(microsecond=0))

    assert pipeline.tasks.sweep_once(now)["messages"] == 4
    sent_at: dict[int, dt.datetime] = {}
    outcomes = [deliver(pipeline, i, sent_at) for i in waiting]

    assert_paced(sent_at, outcomes)
