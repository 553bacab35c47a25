"""A dead worker's rows go back to the queue even when the database refuses
the first release: the supervisor tries again until it answers.

A real supervisor over fixture children, on SQLite. The test holds the
database's write lock (another writer, past the busy timeout) while a worker
that leases a row is SIGKILLed, so the supervisor's release fails; once the
lock is gone, the row must be queued again within seconds, not left to its
lease (minutes).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3

import pytest

from daemon.domain import campaigns
from daemon.store.models import Message
from daemon.store.models import database
from tests.helpers import wait_for
from tests.process.fixture_roles import FixtureDaemon
from tests.send_helpers import open_db
from tests.send_helpers import running_campaign

pytestmark = pytest.mark.slow


@pytest.mark.timeout(90)
def test_a_release_refused_by_a_locked_database_is_tried_again(tmp_path, make_config):
    daemon = FixtureDaemon(tmp_path, make_config, {"database": {"busy_timeout_s": 0.2}})
    log_path = tmp_path / "daemon.log"
    db = None
    try:
        daemon.start(log_path=log_path)
        db = open_db(daemon.cfg)
        campaign_id, _ = running_campaign(1)
        message_id = Message.get(Message.campaign == campaign_id).id
        worker = next(
            r for r in daemon.status()["roles"] if r["name"].startswith("worker:")
        )
        owner = f"{socket.gethostname()}:{worker['pid']}:fixture"
        assert campaigns.claim(message_id, owner, 600) is not None
        database.close()

        locker = sqlite3.connect(
            daemon.cfg.database_url.removeprefix("sqlite:///"), isolation_level=None
        )
        locker.execute("BEGIN EXCLUSIVE")
        try:
            os.kill(worker["pid"], signal.SIGKILL)
            wait_for(
                lambda: "background job failed" in log_path.read_text(),
                timeout=30,
                what="the supervisor's release refused by the lock",
            )
        finally:
            locker.rollback()
            locker.close()

        wait_for(
            lambda: Message.get_by_id(message_id).status == "queued",
            timeout=15,
            what="the dead worker's row queued again",
        )
        assert Message.get_by_id(message_id).lease_owner is None
    finally:
        daemon.close()
        if db is not None:
            db.close()


@pytest.mark.timeout(90)
def test_a_claim_that_commits_after_the_workers_death_is_released_too(
    tmp_path, make_config
):
    """PostgreSQL finishes a statement whose client was killed: a worker's
    claim can commit after the supervisor released the dead worker's rows.
    The test makes that claim itself, for the dead worker, once the first
    release is done; the supervisor's second pass must queue the row again
    within seconds, not leave it `sending` until its lease runs out."""
    daemon = FixtureDaemon(tmp_path, make_config)
    db = None
    try:
        daemon.start(log_path=tmp_path / "daemon.log")
        db = open_db(daemon.cfg)
        campaign_id, _ = running_campaign(2)
        first, late = [
            m.id for m in Message.select().where(Message.campaign == campaign_id)
        ]
        worker = next(
            r for r in daemon.status()["roles"] if r["name"].startswith("worker:")
        )
        owner = f"{socket.gethostname()}:{worker['pid']}:fixture"
        assert campaigns.claim(first, owner, 600) is not None
        database.close()

        os.kill(worker["pid"], signal.SIGKILL)
        wait_for(
            lambda: Message.get_by_id(first).status == "queued",
            timeout=15,
            what="the first release",
        )
        assert campaigns.claim(late, owner, 600) is not None  # commits late
        database.close()
        wait_for(
            lambda: Message.get_by_id(late).status == "queued",
            timeout=20,
            what="the late claim's row queued again",
        )
        assert Message.get_by_id(late).lease_owner is None
    finally:
        daemon.close()
        if db is not None:
            db.close()
