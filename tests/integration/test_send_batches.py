"""Message 1 in batches (Tasks.deliver_all): the fan-out enqueues SEND_BATCH
rows a task, claimed in one statement and sent one after the other.

What is checked is what the phones would show (the fake provider, which
does not dedupe) and what the rows say, on SQLite and on PostgreSQL + Redis.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import peewee
import pytest

from daemon.app.batch_tasks import HANDED_BACK
from daemon.app.batch_tasks import LEFT_FOR_ANOTHER
from daemon.domain import campaigns
from daemon.domain.pacing import Pacer
from daemon.owners import make as make_owner
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import ManualClock
from tests.send_helpers import assert_each_reference_once
from tests.send_helpers import before_each_request
from tests.send_helpers import build_pipeline
from tests.send_helpers import lock_sqlite_for
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

T0 = utcnow().replace(microsecond=0)


pipeline = manual_pipeline(T0)


def running_campaign(pipeline, count: int) -> list[int]:
    """A running campaign's Message 1 ids, its queue emptied (the tests run
    the batch themselves)."""
    campaign = new_campaign(seed_contacts(count))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    pipeline.queues.messages.flush()
    return ids


def row(message_id: int) -> Message:
    return Message.get_by_id(message_id)


def phones_of(fake) -> list[str]:
    return [m["phone"] for m in fake.messages()]


def on_clock_call(tasks, number: int, action) -> None:
    """Run `action` at the tasks' `number`-th reading of the clock. deliver_all
    reads it once before its claim, then once per row after the first, right
    after that row's check: the action at call 2 lands while the first row
    is being sent, before the check of the third."""
    clock, calls = tasks.clock, []

    def read():
        calls.append(1)
        if len(calls) == number:
            action()
        return clock()

    tasks.clock = read


def test_the_fan_out_enqueues_message_1_in_batches(pipeline, fake):
    from daemon.app.batch_tasks import SEND_BATCH

    campaign = new_campaign(seed_contacts(SEND_BATCH + 3))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    messages = pipeline.queues.messages
    messages.flush()
    pipeline.tasks.fan_out(campaign.id)

    batches = [t.args[0] for t in messages.pending() if t.name == "send_messages"]
    assert [len(b) for b in batches] == [SEND_BATCH, 3]
    while (task := messages.dequeue()) is not None:
        messages.execute(task)
    ids = [i for batch in batches for i in batch]
    assert {row(i).status for i in ids} == {"sent"}
    assert_each_reference_once(fake.stats(), fake.messages(), len(ids))


def test_a_batch_sends_each_row_once_past_one_it_cannot_send(pipeline, fake):
    """A row that can no longer go (its contact opted out after the fan-out)
    neither stops the batch nor goes out."""
    ids = running_campaign(pipeline, 4)
    campaigns.opt_out_contact(Contact.get_by_id(row(ids[2]).contact_id), "STOP")

    outcomes = pipeline.tasks.deliver_all(ids)

    assert outcomes == ["sent", "sent", "not claimable", "sent"]
    assert [row(i).status for i in ids] == ["sent", "sent", "cancelled", "sent"]
    assert [row(i).attempts for i in ids] == [1, 1, 0, 1]
    assert_each_reference_once(fake.stats(), fake.messages(), 3)
    assert row(ids[2]).phone not in phones_of(fake)


def test_a_stop_during_a_batch_is_obeyed_by_the_rows_it_had_claimed(pipeline, fake):
    """The rows are claimed together, then each is checked again right
    before its send: a STOP that arrives while the first row is being sent
    cancels the third, already claimed, and nothing reaches that phone."""
    ids = running_campaign(pipeline, 3)
    stopped = Contact.get_by_id(row(ids[2]).contact_id)
    on_clock_call(pipeline.tasks, 2, lambda: campaigns.opt_out_contact(stopped, "STOP"))

    outcomes = pipeline.tasks.deliver_all(ids)

    assert outcomes == ["sent", "sent", HANDED_BACK]
    assert [(row(i).status, row(i).attempts) for i in ids] == [
        ("sent", 1),
        ("sent", 1),
        ("cancelled", 0),
    ]
    assert stopped.phone not in phones_of(fake)
    assert pipeline.queues.messages.pending() == []
    assert_each_reference_once(fake.stats(), fake.messages(), 2)


def test_a_pause_during_a_batch_gives_the_claimed_rows_back(pipeline, fake):
    """Paused while the first row is being sent: the rows claimed with it
    go back to queued (no attempt counted) and out on resume, once each."""
    ids = running_campaign(pipeline, 3)
    campaign_id = row(ids[0]).campaign_id
    tasks = pipeline.tasks
    on_clock_call(tasks, 2, lambda: campaigns.pause_campaign(campaign_id))

    assert tasks.deliver_all(ids) == ["sent", "sent", HANDED_BACK]
    assert [(row(i).status, row(i).attempts) for i in ids[2:]] == [("queued", 0)]
    assert row(ids[2]).lease_owner is None

    campaigns.resume_campaign(campaign_id, tasks)
    messages = pipeline.queues.messages
    while (task := messages.dequeue()) is not None:
        messages.execute(task)
    assert [row(i).status for i in ids] == ["sent"] * 3
    assert_each_reference_once(fake.stats(), fake.messages(), 3)


def test_a_cancel_during_a_batch_cancels_the_claimed_rows(pipeline, fake):
    ids = running_campaign(pipeline, 3)
    campaign_id = row(ids[0]).campaign_id
    on_clock_call(pipeline.tasks, 2, lambda: campaigns.cancel_campaign(campaign_id))

    assert pipeline.tasks.deliver_all(ids) == ["sent", "sent", HANDED_BACK]
    assert row(ids[2]).status == "cancelled"
    assert row(ids[2]).phone not in phones_of(fake)
    assert pipeline.queues.messages.pending() == []


def test_a_batch_stopped_by_draining_gives_its_rows_back(pipeline, fake):
    """A worker told to drain in the middle of a batch sends nothing more:
    the rows it had claimed go back unclaimed (queued, no attempt counted)
    and are enqueued again, one task each, for another worker."""
    ids = running_campaign(pipeline, 3)
    tasks = pipeline.tasks
    on_clock_call(tasks, 1, tasks.draining.set)  # read right before the claim

    outcomes = tasks.deliver_all(ids)

    assert outcomes == ["sent"] + [LEFT_FOR_ANOTHER] * 2
    assert [(row(i).status, row(i).attempts) for i in ids] == [
        ("sent", 1),
        ("queued", 0),
        ("queued", 0),
    ]
    assert all(row(i).lease_owner is None for i in ids)
    queued = [(t.name, t.args) for t in pipeline.queues.messages.pending()]
    assert sorted(queued) == [
        ("send_single_message", (ids[1],)),
        ("send_single_message", (ids[2],)),
    ]
    assert fake.stats()["sends_accepted"] == 1


def test_a_slow_batch_hands_the_rest_of_its_rows_on(pipeline, fake):
    """With a slow provider a batch sends no more than its time budget
    allows (tasks.BATCH_BUDGET_S): the rest goes back to the queue, a task a
    row, so idle threads and a Message 2 need not wait behind it. Each row
    is still sent once."""
    from daemon.app.batch_tasks import BATCH_BUDGET_S

    ids = running_campaign(pipeline, 3)
    fake.configure(latency_ms=BATCH_BUDGET_S * 1000 + 50)

    outcomes = pipeline.tasks.deliver_all(ids)

    assert outcomes == ["sent", LEFT_FOR_ANOTHER, LEFT_FOR_ANOTHER]
    assert [(row(i).status, row(i).attempts) for i in ids] == [
        ("sent", 1),
        ("queued", 0),
        ("queued", 0),
    ]
    messages = pipeline.queues.messages
    assert sorted(t.args for t in messages.pending()) == [(ids[1],), (ids[2],)]
    fake.configure(latency_ms=0)
    while (task := messages.dequeue()) is not None:
        assert messages.execute(task) == "sent"
    assert_each_reference_once(fake.stats(), fake.messages(), 3)


def test_a_batch_left_by_a_dead_worker_goes_back_at_once(pipeline, fake):
    """A worker killed mid-batch holds leases on rows it never sent. The
    supervisor's release (release_dead_worker) makes the one on the wire
    unconfirmed and queues the others again at once, enqueued."""
    ids = running_campaign(pipeline, 4)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    host = "batch-host"
    claimed = campaigns.claim_many(ids, make_owner(host, pid), 60)
    assert sorted(claimed) == sorted(ids)

    released = pipeline.tasks.release_dead_worker(host, pid, {ids[0]})

    assert released.unconfirmed == 1
    assert sorted(m for m, _ in released.requeued) == sorted(ids[1:])
    assert [row(i).status for i in ids] == ["unconfirmed"] + ["queued"] * 3
    enqueued = sorted(t.args for t in pipeline.queues.messages.pending())
    assert enqueued == [(i,) for i in sorted(ids[1:])]
    assert fake.stats()["sends_accepted"] == 0


def test_sends_that_became_paced_are_not_batched(pipeline, fake):
    """A batch enqueued before pacing was configured (a reload) is not
    claimed: its rows are enqueued again a task each, for the pacer."""
    ids = running_campaign(pipeline, 2)
    tasks = pipeline.tasks
    tasks.pacer = Pacer(dataclasses.replace(tasks.pacer.cfg, per_minute=60.0), "")
    assert not tasks.pacer.unlimited

    assert tasks.deliver_all(ids) == [LEFT_FOR_ANOTHER] * 2
    assert [row(i).status for i in ids] == ["queued", "queued"]
    assert sorted(t.args for t in pipeline.queues.messages.pending()) == [
        (i,) for i in sorted(ids)
    ]
    assert fake.stats()["sends_accepted"] == 0


def test_a_refusal_met_by_a_locked_database_is_recorded_once_it_answers(
    make_config, fake
):
    """The provider refuses the second row of a batch (HTTP 500) while
    another writer holds SQLite's lock past the busy timeout, for a second.
    The refusal is recorded as a retry once the database answers, not
    dropped: the row must not stay leased to this live worker until the
    lease expires (minutes), then wait as unconfirmed although it never
    left. The batch then hands on the rows it has no time left for, and
    every phone gets Message 1 once."""
    cfg = make_config(
        "sqlite",
        {"provider": {"base_url": fake.url}, "database": {"busy_timeout_s": 0.1}},
    )
    clock = ManualClock(T0)
    pipeline = build_pipeline(cfg, clock)
    try:
        ids = running_campaign(pipeline, 4)
        locker, lock = lock_sqlite_for(cfg)

        def lock_and_refuse():
            lock()
            fake.configure(fail_rate=1.0)

        on_clock_call(pipeline.tasks, 2, lock_and_refuse)

        outcomes = pipeline.tasks.deliver_all(ids)

        assert outcomes[0] == "sent"
        assert outcomes[1].startswith("retry at ")
        assert outcomes[2:] == [LEFT_FOR_ANOTHER] * 2
        refused = row(ids[1])
        assert (refused.status, refused.failures, refused.lease_owner) == (
            "queued",
            1,
            None,
        )
        assert refused.next_attempt_at is not None
        for unsent in ids[2:]:
            assert (row(unsent).status, row(unsent).attempts) == ("queued", 0)
        messages = pipeline.queues.messages
        assert sorted(t.args for t in messages.pending()) == [(i,) for i in ids[2:]]
        fake.configure(fail_rate=0.0)
        assert messages.execute(messages.dequeue()) == "sent"
        assert messages.execute(messages.dequeue()) == "sent"
        clock.set(refused.next_attempt_at)
        assert pipeline.tasks.deliver(ids[1]) == "sent"
        assert_each_reference_once(fake.stats(), fake.messages(), 4)
        locker.close()
    finally:
        pipeline.close()


def test_a_batch_cut_by_a_database_error_gives_its_unsent_rows_back(make_config, fake):
    """A slow provider uses up the batch's time budget on its first row, and
    the database fails right then (another writer holds SQLite's lock past
    the busy timeout, for a second): giving the rest back fails, and the
    batch stops with that error. The first row, accepted, is recorded sent
    once the database answers, and the rows not sent are given back then,
    not left leased to this live worker until the lease expires. Each goes
    out once."""
    from daemon.app.batch_tasks import BATCH_BUDGET_S

    cfg = make_config(
        "sqlite",
        {"provider": {"base_url": fake.url}, "database": {"busy_timeout_s": 0.1}},
    )
    pipeline = build_pipeline(cfg, ManualClock(T0))
    try:
        ids = running_campaign(pipeline, 4)
        fake.configure(latency_ms=BATCH_BUDGET_S * 1000 + 50)
        locker, lock = lock_sqlite_for(cfg)
        before_each_request(pipeline.tasks, lock)

        with pytest.raises(peewee.OperationalError, match="locked"):
            pipeline.tasks.deliver_all(ids)

        assert fake.stats()["sends_accepted"] == 1
        assert row(ids[0]).status == "sent"
        for unsent in ids[1:]:
            assert (row(unsent).status, row(unsent).attempts) == ("queued", 0)
        messages = pipeline.queues.messages
        assert sorted(t.args for t in messages.pending()) == [(i,) for i in ids[1:]]
        del pipeline.tasks.inflight.begin
        fake.configure(latency_ms=0)
        while (task := messages.dequeue()) is not None:
            assert messages.execute(task) == "sent"
        assert_each_reference_once(fake.stats(), fake.messages(), 4)
        locker.close()
    finally:
        pipeline.close()


def test_a_batch_whose_record_fails_records_its_sends_once_the_database_answers(
    make_config, fake
):
    """The sends of a batch are recorded together at its end. When that
    record fails (SQLite locked past the busy timeout, for longer than the
    hard time limit), the batch keeps trying while its worker lives, and
    every row the provider accepted ends up `sent`: none is left leased to
    wait for its lease to run out, none sent again."""
    cfg = make_config(
        "sqlite",
        {
            "provider": {"base_url": fake.url, "timeout_s": 0.5},
            "database": {"busy_timeout_s": 0.1},
            "workers": {"soft_time_limit_s": 1.0, "hard_time_limit_s": 1.5},
        },
    )
    pipeline = build_pipeline(cfg, ManualClock(T0))
    try:
        ids = running_campaign(pipeline, 3)
        locker, lock = lock_sqlite_for(cfg, seconds=3.0)
        on_clock_call(pipeline.tasks, 3, lock)

        with pytest.raises(peewee.OperationalError, match="locked"):
            pipeline.tasks.deliver_all(ids)

        assert [row(i).status for i in ids] == ["sent"] * 3
        assert all(row(i).lease_owner is None for i in ids)
        assert list(pipeline.queues.messages.pending()) == []
        assert_each_reference_once(fake.stats(), fake.messages(), 3)
        locker.close()
    finally:
        pipeline.close()
