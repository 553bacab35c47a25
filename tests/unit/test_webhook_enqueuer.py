"""Webhook group commit: answer after the commit, enqueue afterwards (issue 12).

The EventWriter on a real SQLite file, with stand-ins for the queue that hang
or fail: an answer never waits on the queue, what the queue does not take in
web.enqueue_timeout_s is left to the sweeper, and the writer's commits are
durable (synchronous=FULL) while the rest of the process keeps NORMAL.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import peewee as pw
import pytest

from daemon.domain import campaigns
from daemon.roles.web import event_writer
from daemon.roles.web.event_writer import Enqueuer
from daemon.roles.web.event_writer import EventWriter
from daemon.roles.web.webhooks import WebhookIngest
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

SQLITE_FULL, SQLITE_NORMAL = 2, 1


def inbound(msg_id: str) -> dict:
    return {
        "id": msg_id,
        "event": "message:in:new",
        "data": {"id": msg_id, "flow": "inbound", "fromNumber": "+33612345678"},
    }


class _NoQueue:
    """A queue that takes everything and keeps nothing."""

    def enqueue_event_chunks(self, chunks):
        pass


def meta_statuses(prefix: str, count: int) -> dict:
    """One Meta POST with `count` delivery statuses (Meta batches them)."""
    statuses = [
        {
            "id": f"wamid.{prefix}{i}",
            "status": "delivered",
            "timestamp": "1750857384",
            "recipient_id": "5516992318222",
        }
        for i in range(count)
    ]
    value = {"messaging_product": "whatsapp", "statuses": statuses}
    change = {"field": "messages", "value": value}
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1314702302917944", "changes": [change]}],
    }


class HangingQueue:
    """enqueue_event_chunks blocks until released (a hung Redis)."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[list[list[int]]] = []

    def enqueue_event_chunks(self, chunks: list[list[int]]) -> None:
        self.calls.append([list(c) for c in chunks])
        assert self.release.wait(30)


class RefusingQueue:
    """enqueue_event_chunks fails (Redis refusing connections)."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def enqueue_event_chunks(self, chunks: list[list[int]]) -> None:
        self.calls.append([list(c) for c in chunks])
        raise ConnectionError(
            "Error 111 connecting to 127.0.0.1:1. Connection refused."
        )


@pytest.fixture
def db(make_config):
    cfg = make_config("sqlite")
    open_database(cfg, migrate_schema=True)
    database.close()
    yield cfg
    database.close()


def unprocessed_ids() -> list[int]:
    with database.connection_context():
        query = InboundEvent.select(InboundEvent.id).where(
            InboundEvent.processed_at.is_null()
        )
        return sorted(e.id for e in query)


def swept_ids() -> list[int]:
    """What the sweeper would replay once its grace has passed."""
    later = utcnow() + dt.timedelta(minutes=5)
    with database.connection_context():
        return sorted(campaigns.sweep(later, grace_s=30).events)


class StoppedClock:
    """The Enqueuer's monotonic clock, moved only by the test."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    # Durations (the commit histogram) stay on the real clock.
    perf_counter = staticmethod(time.perf_counter)


def test_answers_do_not_wait_for_a_hung_queue(db, monkeypatch):
    clock = StoppedClock()
    monkeypatch.setattr(event_writer, "time", clock)  # the enqueue deadlines
    hung = HangingQueue()
    writer = EventWriter(hung, enqueue_timeout_s=30.0)
    ingest = WebhookIngest("wassenger", hung, writer=writer)
    try:
        assert ingest.ingest(inbound("H0")) == (1, 0)
        wait_for(lambda: hung.calls, what="the first enqueue to hang")
        # The queue is stuck in the first enqueue and no enqueue deadline can
        # pass: the next webhooks are answered all the same. An answer that
        # waited on the queue would not come before the release (or, on a
        # real clock, one 30 s enqueue timeout each).
        with ThreadPoolExecutor(1) as pool:
            answers = pool.submit(
                lambda: [ingest.ingest(inbound(f"H{i}")) for i in range(1, 9)]
            )
            assert answers.result(timeout=30.0) == [(1, 0)] * 8
        assert len(hung.calls) == 1 and not hung.release.is_set()
        # Release the queue only once the waiting batches are past their
        # enqueue deadline: they are given up, not enqueued late.
        clock.now += 30.0
        hung.release.set()
        assert writer.enqueuer.wait_idle(10)
        assert len(hung.calls) == 1
        stored = unprocessed_ids()
        assert len(stored) == 9
        assert swept_ids() == stored  # all of them, the hung one included
    finally:
        hung.release.set()


def test_a_refusing_queue_gives_up_the_round_and_leaves_it_to_the_sweeper(db):
    refused = RefusingQueue()
    writer = EventWriter(refused, enqueue_timeout_s=5.0)
    ingest = WebhookIngest("meta", refused, writer=writer)
    # Answered (stored) whatever the queue says; that an answer never waits
    # on the queue is test_answers_do_not_wait_for_a_hung_queue's.
    assert ingest.ingest(meta_statuses("R", 40)) == (40, 0)
    assert writer.enqueuer.wait_idle(10)
    # One attempt for the whole round (five tasks of 8), then nothing more:
    # the backend is down.
    assert len(refused.calls) == 1
    assert [len(c) for c in refused.calls[0]] == [Enqueuer.TASK_CHUNK] * 5
    assert swept_ids() == unprocessed_ids() and len(unprocessed_ids()) == 40


def test_a_healthy_queue_gets_every_event_in_chunks_in_one_call(db):
    class Recording:
        def __init__(self):
            self.calls: list[list[list[int]]] = []

        def enqueue_event_chunks(self, chunks):
            self.calls.append([list(c) for c in chunks])

    tasks = Recording()
    writer = EventWriter(tasks)
    ingest = WebhookIngest("meta", tasks, writer=writer)
    assert ingest.ingest(meta_statuses("OK", 20)) == (20, 0)
    assert writer.enqueuer.wait_idle(10)
    assert len(tasks.calls) == 1 and [len(c) for c in tasks.calls[0]] == [8, 8, 4]
    assert sorted(i for c in tasks.calls[0] for i in c) == unprocessed_ids()


@pytest.mark.parametrize(
    ("level", "expected"), [("full", SQLITE_FULL), ("normal", SQLITE_NORMAL)]
)
def test_the_writer_connection_commits_with_its_own_synchronous_level(
    db, level, expected
):
    seen = []

    class Spy(EventWriter):
        sqlite_synchronous = level

        def _insert(self, rows):
            seen.append(database.execute_sql("PRAGMA synchronous").fetchone()[0])
            return super()._insert(rows)

    writer = Spy(_NoQueue())
    ingest = WebhookIngest("wassenger", _NoQueue(), writer=writer)
    ingest.ingest(inbound("S1"))
    ingest.ingest(inbound("S2"))
    assert seen == [expected, expected]
    # Other connections of the process keep the default.
    with database.connection_context():
        assert database.execute_sql("PRAGMA synchronous").fetchone()[0] == SQLITE_NORMAL


@pytest.mark.parametrize("count", [12, 450], ids=["one statement", "three chunks"])
def test_a_request_gets_the_ids_of_its_new_events_and_none_of_known_ones(db, count):
    """The writer answers a request with those of its events that were new,
    under the ids and types the database holds (on SQLite found after an
    INSERT without RETURNING), whether they fit in one INSERT or not."""

    def row(key: str) -> dict:
        return {
            "provider": "meta",
            "dedupe_key": key,
            "event_type": f"status:{key}",  # tells each row's id apart
            "payload": json.dumps({"key": key}),
            "received_at": utcnow(),
            "attempts": 0,
        }

    writer = EventWriter(_NoQueue())
    keys = [f"key-{i}-{'abc'[i % 3]}" for i in range(count)]
    known = keys[::3]
    first_answer = writer.store([row(k) for k in known])  # all of them new
    with database.connection_context():
        last_known = InboundEvent.select(pw.fn.MAX(InboundEvent.id)).scalar()
        held = [(e.id, e.event_type) for e in InboundEvent.select()]
    assert sorted(first_answer) == sorted(held) and len(held) == len(known)

    answer = writer.store([row(k) for k in keys])  # known and new, interleaved

    with database.connection_context():
        added = {
            e.dedupe_key: (e.id, e.event_type)
            for e in InboundEvent.select().where(InboundEvent.id > last_known)
        }
    new = [k for k in keys if k not in known]
    assert sorted(added) == sorted(new)
    assert sorted(answer) == sorted(added.values())


def _event_row(key: str) -> dict:
    return {
        "provider": "wassenger",
        "dedupe_key": key,
        "event_type": "message:in:new",
        "payload": "{}",
        "received_at": utcnow(),
        "attempts": 0,
    }


def test_a_writer_that_does_not_commit_in_time_fails_the_request(db):
    """A stuck database: the request gets an OperationalError (the web app
    answers 503) after timeout_s, and a later request is served once the
    writer is free again."""
    release = threading.Event()

    class Stuck(EventWriter):
        def _insert(self, rows):
            release.wait(30)
            return super()._insert(rows)

    writer = Stuck(_NoQueue(), timeout_s=0.3)
    with pytest.raises(pw.OperationalError, match="did not commit within 0.3 s"):
        writer.store([_event_row("stuck-1")])
    release.set()
    assert [t for _, t in writer.store([_event_row("stuck-2")])] == ["message:in:new"]
    with database.connection_context():
        keys = sorted(e.dedupe_key for e in InboundEvent.select())
    assert keys == ["stuck-1", "stuck-2"]  # the late commit landed too


def test_a_failed_group_commit_fails_every_request_in_it(db):
    """Requests folded into one transaction share its fate: each gets the
    error, none an answer of stored events."""
    entered, release = threading.Event(), threading.Event()

    class Failing(EventWriter):
        def _insert(self, rows):
            if not entered.is_set():
                entered.set()
                release.wait(30)  # the other requests queue up meanwhile
                return super()._insert(rows)
            raise pw.OperationalError("disk I/O error")

    writer = Failing(_NoQueue())
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(writer.store, [_event_row("first")])
        assert entered.wait(10)
        others = [pool.submit(writer.store, [_event_row(f"k{i}")]) for i in range(3)]
        wait_for(lambda: writer._pending.qsize() == 3, timeout=10)
        release.set()
        assert [t for _, t in first.result(10)] == ["message:in:new"]
        for future in others:
            with pytest.raises(pw.OperationalError, match="disk I/O error"):
                future.result(10)


def test_a_failure_after_the_commit_answers_at_once_and_the_writer_goes_on(
    db, monkeypatch
):
    """The events are committed: the request is answered (not left waiting
    for the writer's timeout), the sweeper finds what was not enqueued, and
    the next request is stored by the same writer."""
    tasks = _NoQueue()
    writer = EventWriter(tasks, timeout_s=20.0)

    def broken_submit(ids):
        raise RuntimeError("a bug past the commit")

    monkeypatch.setattr(writer.enqueuer, "submit", broken_submit)
    started = time.monotonic()
    writer.store([_event_row("after-commit")])
    assert time.monotonic() - started < 10
    assert unprocessed_ids() == swept_ids()  # stored, left to the sweeper
    assert len(unprocessed_ids()) == 1
    monkeypatch.undo()
    assert [t for _, t in writer.store([_event_row("next")])] == ["message:in:new"]
    assert len(unprocessed_ids()) == 2


def test_under_load_the_enqueuer_gathers_batches_into_fewer_rounds(db):
    """The first batch after a quiet spell is enqueued at once; batches that
    arrive while the next round waits out ROUND_GAP_S go in that one call."""

    class Recording:
        def __init__(self):
            self.calls: list[list[int]] = []

        def enqueue_event_chunks(self, chunks):
            self.calls.append(sorted(i for chunk in chunks for i in chunk))

    class Gapped(Enqueuer):
        ROUND_GAP_S = 2.0

    tasks = Recording()
    enqueuer = Gapped(tasks, timeout_s=30.0)
    enqueuer.submit([1, 2])
    wait_for(lambda: tasks.calls, timeout=1.5, what="the first round, without the gap")
    for ids in ([3], [4, 5], [6]):
        enqueuer.submit(ids)
    assert enqueuer.wait_idle(15)
    assert tasks.calls == [[1, 2], [3, 4, 5, 6]]
