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
