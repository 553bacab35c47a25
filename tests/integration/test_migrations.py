"""Schema migrations: they apply, they are idempotent, and racing starts are safe."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon.store.db import close_database
from daemon.store.db import make_database
from daemon.store.db import migrate
from daemon.store.db import migration_names
from daemon.store.db import open_database
from daemon.store.db import schema_versions
from daemon.store.models import MODELS
from daemon.store.models import Contact
from tests.helpers import run_cli
from tests.helpers import subprocess_env

PROCESSES = 6

# Each racer imports everything first, says "ready", then blocks on stdin so
# the parent can release all of them at the same moment.
RACER = """
import sys
from daemon import config
from daemon.store.db import open_database
cfg = config.load(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
db = open_database(cfg, migrate_schema=True)
db.close()
print("done", flush=True)
"""


@pytest.fixture(params=["sqlite", "postgres"])
def cfg(request, make_config):
    if request.param == "sqlite":
        return make_config("sqlite")
    pg = request.getfixturevalue("pg_url")
    return make_config("sqlite", {"database": {"url": pg}})


def _version_counts(db) -> dict[str, int]:
    with db.connection_context():
        rows = db.execute_sql(
            "SELECT name, COUNT(*) FROM schema_version GROUP BY name"
        ).fetchall()
    return dict(rows)


def test_migrations_create_every_table(cfg):
    db = open_database(cfg, migrate_schema=True)
    try:
        assert schema_versions(db) == migration_names()
        assert migration_names()[0] == "m0001_initial"
        with db.connection_context():
            tables = set(db.get_tables())
        assert {model._meta.table_name for model in MODELS} <= tables
    finally:
        close_database(db)


def test_migrations_are_idempotent_and_keep_data(cfg):
    db = open_database(cfg, migrate_schema=True)
    try:
        with db.connection_context():
            Contact.create(phone="+33612345678", name="Ann")
        assert migrate(db) == []
        assert migrate(db) == []
        assert _version_counts(db) == dict.fromkeys(migration_names(), 1)
        with db.connection_context():
            assert Contact.get(Contact.phone == "+33612345678").name == "Ann"
    finally:
        close_database(db)


def test_open_without_migrate_leaves_the_database_alone(cfg):
    db = open_database(cfg, migrate_schema=False)
    try:
        with db.connection_context():
            assert "schema_version" not in db.get_tables()
    finally:
        close_database(db)


@pytest.mark.timeout(90)
def test_concurrent_first_start_applies_each_migration_once(cfg):
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, cfg.source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for _ in range(PROCESSES)
    ]
    try:
        for racer in racers:
            assert racer.stdout.readline().strip() == "ready"
        for racer in racers:
            racer.stdin.write("go\n")
            racer.stdin.flush()
        results = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    for racer, (out, err) in zip(racers, results, strict=True):
        assert racer.returncode == 0, err
        assert out.strip() == "done"
    db = make_database(cfg.database_url, cfg)
    try:
        assert _version_counts(db) == dict.fromkeys(migration_names(), 1)
    finally:
        close_database(db)


# The indexes m0006 replaces, as m0001..m0005 made them.
OLD_INDEXES = (
    'CREATE INDEX "message_campaign_id" ON "message" ("campaign_id")',
    'CREATE INDEX "message_provider_id" ON "message" ("provider_id")',
    'CREATE INDEX "message_wa_id" ON "message" ("wa_id")',
    'CREATE INDEX "message_lease_owner" ON "message" ("lease_owner")',
    'CREATE INDEX "campaign_contact_campaign_id" ON "campaign_contact" ("campaign_id")',
    'CREATE INDEX "campaign_contact_contact_id" ON "campaign_contact" ("contact_id")',
    'CREATE INDEX "campaign_contact_campaign_id_state" ON "campaign_contact" '
    '("campaign_id", "state")',
)


def _index_names(db) -> dict[str, set[str]]:
    return {
        table: {index.name for index in db.get_indexes(table)}
        for table in ("message", "campaign_contact")
    }


def test_m0006_drops_only_the_redundant_indexes_present(cfg):
    from daemon.store.migrations import m0006_lean_indexes

    db = open_database(cfg, migrate_schema=True)
    try:
        with db.connection_context():
            fresh = _index_names(db)
            assert "message_campaign_id" not in fresh["message"]
            assert "message_provider_id_set" in fresh["message"]
            # On a database created by this version: nothing to do.
            with db.atomic():
                m0006_lean_indexes.up(db)
            assert _index_names(db) == fresh
            # An older database: the old indexes (some of them only), and
            # one of the partial ones missing.
            with db.atomic():
                for sql in OLD_INDEXES[::2]:
                    db.execute_sql(sql)
                db.execute_sql('DROP INDEX "message_wa_id_set"')
            with db.atomic():
                m0006_lean_indexes.up(db)
            assert _index_names(db) == fresh
    finally:
        close_database(db)


def test_a_command_refuses_an_older_schema_until_campaignd_migrate(cfg):
    # A database of the version before m0009: a newer install's commands must
    # not migrate it under a daemon that may still run the older code.
    older = {
        "m0009_number_check": "number_check",
        "m0010_console_logout": "console_logout",
    }
    db = open_database(cfg, migrate_schema=True)
    try:
        with db.connection_context():
            Contact.create(phone="+33612345678", name="Ann")
            for name, table in older.items():
                db.execute_sql(f'DROP TABLE "{table}"')
                db.execute_sql(
                    f"DELETE FROM schema_version WHERE name = {db.param}", (name,)
                )
    finally:
        close_database(db)
    names = ", ".join(older)

    refused = run_cli("contacts", "list", cfg=cfg)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.splitlines() == [
        "campaignd: error: the database schema is older than this campaignd"
        f" (2 migrations to apply: {names}): restart the daemon (it applies them"
        " when it starts) or run `campaignd migrate`"
    ]
    db = make_database(cfg.database_url, cfg)
    try:
        assert not set(older) & set(schema_versions(db))
        with db.connection_context():
            assert not set(older.values()) & set(db.get_tables())
    finally:
        close_database(db)

    applied = run_cli("migrate", cfg=cfg)
    assert (applied.returncode, applied.stdout) == (
        0,
        f"applied 2 migrations: {names}\n",
    )
    listed = run_cli("contacts", "list", cfg=cfg)
    assert listed.returncode == 0, listed.stderr
    assert "+33612345678" in listed.stdout
    again = run_cli("migrate", cfg=cfg)
    assert (again.returncode, again.stdout) == (
        0,
        "the database schema is up to date\n",
    )


def test_a_command_creates_a_new_database(cfg):
    created = run_cli("contacts", "list", cfg=cfg)
    assert created.returncode == 0, created.stderr
    db = make_database(cfg.database_url, cfg)
    try:
        assert schema_versions(db) == migration_names()
    finally:
        close_database(db)
