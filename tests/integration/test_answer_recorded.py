"""What became of a held row is recorded even when the database fails then.

A lone send (Tasks.deliver) gets the provider's answer, or the pacer's
"not now", while the database does not answer: SQLite locked by another
writer past the busy timeout, or this thread's PostgreSQL connection cut
(pg_terminate_backend, as a restart does). What happened is known to the
worker's thread alone: given up, the row would stay leased to this live
worker until its lease ran out (minutes), then wait as unconfirmed, even
when no request had left for it. It is recorded once the database answers,
and each phone gets Message 1 once.
"""

from __future__ import annotations

import psycopg
import pytest

from daemon.domain import campaigns
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.integration.test_opt_out_final import one_message
from tests.integration.test_opt_out_final import requests_to
from tests.send_helpers import before_each_request
from tests.send_helpers import lock_sqlite_for
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

T0 = utcnow().replace(microsecond=0)


pipeline = manual_pipeline(T0, {"database": {"busy_timeout_s": 0.1}})


def database_failure(pipeline):
    """What makes the database stop answering this thread: SQLite locked for
    a second by another writer, or this thread's PostgreSQL connection
    terminated."""
    cfg = pipeline.cfg
    if cfg.database_url.startswith("sqlite"):
        _locker, fail = lock_sqlite_for(cfg, seconds=1.0)
        return fail
    backend = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]

    def fail():
        with psycopg.connect(cfg.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))

    return fail


def fail_the_database_during_the_send(pipeline) -> None:
    """Right before the request's first byte leaves, the database fails."""
    before_each_request(pipeline.tasks, database_failure(pipeline))


def test_an_accepted_send_is_recorded_sent_once_the_database_answers(pipeline, fake):
    _campaign, contact, message_id = one_message(pipeline)
    fail_the_database_during_the_send(pipeline)

    assert pipeline.tasks.deliver(message_id) == "sent"

    row = Message.get_by_id(message_id)
    assert (row.status, row.lease_owner) == ("sent", None)
    assert row.provider_id
    assert requests_to(fake, contact.phone) == 1


def test_a_refused_send_is_recorded_as_a_retry_once_the_database_answers(
    pipeline, fake
):
    _campaign, contact, message_id = one_message(pipeline)
    fake.configure(fail_rate=1.0)
    fail_the_database_during_the_send(pipeline)

    outcome = pipeline.tasks.deliver(message_id)

    assert outcome.startswith("retry at "), outcome
    row = Message.get_by_id(message_id)
    assert (row.status, row.failures, row.lease_owner) == ("queued", 1, None)
    assert requests_to(fake, contact.phone) == 0
    fake.configure(fail_rate=0.0)
    pipeline.clock.set(row.next_attempt_at)
    assert pipeline.tasks.deliver(message_id) == "sent"
    assert requests_to(fake, contact.phone) == 1


pipeline_paced = manual_pipeline(
    T0,
    {
        "database": {"busy_timeout_s": 0.1},
        "pacing": {"per_minute": 1, "daily_cap": 0, "jitter_s": 0.0},
    },
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_paced_row_is_given_back_once_the_database_answers(
    pipeline_paced, fake, when
):
    """Sends paced at one a minute: the second row, claimed, must wait for
    the next minute, and the database fails as the pacer takes its slot
    (before) or as the worker gives the row back (after). The row is given
    back (queued, its slot kept) once the database answers: not left
    leased, then unconfirmed, though no request left for it."""
    pipeline = pipeline_paced
    campaign = new_campaign(seed_contacts(2))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    first, second = campaigns.fan_out(campaign.id)
    assert pipeline.tasks.deliver(first) == "sent"
    pacer, fail = pipeline.tasks.pacer, database_failure(pipeline)
    decide = pacer.decide

    calls = []

    def fail_then_decide(*args, **kwargs):
        # The row is claimed: the pacer decides, then the row goes back.
        calls.append(when)
        if calls == ["before"]:
            fail()
        decision = decide(*args, **kwargs)
        if calls == ["after"]:
            fail()
        return decision

    pacer.decide = fail_then_decide

    assert pipeline.tasks.deliver(second).startswith("deferred")

    row = Message.get_by_id(second)
    # A pacing release does not count the attempt: no request left.
    assert (row.status, row.lease_owner, row.attempts) == ("queued", None, 0)
    assert row.paced_until is not None
    pipeline.clock.set(row.next_attempt_at)
    del pacer.decide
    assert pipeline.tasks.deliver(second) == "sent"
    assert sorted(m["phone"] for m in fake.messages()) == [
        Message.get_by_id(first).phone,
        Message.get_by_id(second).phone,
    ]
