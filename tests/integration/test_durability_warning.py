"""The supervisor warns at start when PostgreSQL can undo acknowledged commits.

With synchronous_commit (or fsync) off, a server crash can take back a send
recorded as made; the row comes back queued and the contact gets it twice.
campaignd cannot survive that setting, so it says so in its log at start.
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

import psycopg
import pytest

from daemon.app import recovery
from daemon.store.db import open_database

pytestmark = pytest.mark.timeout(60)

WARNING = "synchronous_commit=off"


def _start_log(cfg, caplog) -> str:
    db = open_database(cfg, migrate_schema=True)
    try:
        with caplog.at_level(logging.WARNING, logger="daemon.supervision.supervisor"):
            recovery.release_at_start(cfg)
    finally:
        db.close()
    return caplog.text


def test_postgres_with_synchronous_commit_off_is_reported_at_start(
    make_config, pg_url, caplog
):
    name = urlparse(pg_url).path.lstrip("/")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    cfg = make_config("pgqueue", pg=pg_url)
    assert WARNING in _start_log(cfg, caplog)


def test_a_durable_postgres_or_sqlite_gets_no_warning(make_config, pg_url, caplog):
    assert WARNING not in _start_log(make_config("pgqueue", pg=pg_url), caplog)
    assert WARNING not in _start_log(make_config("sqlite"), caplog)
