"""The provider's answer is recorded even when the database fails right then.

A lone send (Tasks.deliver) gets its answer while the database does not
answer: SQLite locked by another writer past the busy timeout, or this
thread's PostgreSQL connection cut (pg_terminate_backend, as a restart
does). The answer exists only in the worker's thread: given up, the row
would stay leased to this live worker until its lease ran out (minutes),
then wait as unconfirmed, even when the provider had refused it. It is
recorded once the database answers, and each phone gets Message 1 once.
"""

from __future__ import annotations

import psycopg
import pytest

from daemon.providers.fake import FakeOptions
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.integration.test_opt_out_final import one_message
from tests.integration.test_opt_out_final import requests_to
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import lock_sqlite_for
from tests.send_helpers import mode_config

T0 = utcnow().replace(microsecond=0)


@pytest.fixture
def fake_options():
    return FakeOptions(ack_delays_ms=(), dedupe=False)


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline(request, make_config, fake):
    cfg = mode_config(
        request,
        make_config,
        request.param,
        {"provider": {"base_url": fake.url}, "database": {"busy_timeout_s": 0.1}},
    )
    clock = ManualClock(T0)
    built = build_pipeline(cfg, clock)
    built.clock = clock
    yield built
    built.close()


def fail_the_database_during_the_send(pipeline) -> None:
    """Right before the request's first byte leaves, the database stops
    answering this thread: SQLite locked for a second by another writer, or
    this thread's PostgreSQL connection terminated."""
    cfg = pipeline.cfg
    if cfg.database_url.startswith("sqlite"):
        _locker, fail = lock_sqlite_for(cfg, seconds=1.0)
    else:
        backend = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]

        def fail():
            with psycopg.connect(cfg.database_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend,))

    inflight = pipeline.tasks.inflight
    begin = inflight.begin

    def fail_then_begin(message_id):
        fail()
        begin(message_id)

    inflight.begin = fail_then_begin


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
