"""m0003: the indexes for big campaigns, added to a database that lacks them."""

from __future__ import annotations

import pytest

from daemon.store.db import migrate
from daemon.store.db import open_database
from daemon.store.migrations.m0003_scale_indexes import INDEXES


@pytest.fixture(params=["sqlite", "postgres"])
def cfg(request, make_config):
    if request.param == "sqlite":
        return make_config("sqlite")
    pg = request.getfixturevalue("pg_url")
    return make_config("sqlite", {"database": {"url": pg}})


def _present(db) -> set[tuple[str, tuple[str, ...]]]:
    return {
        (table, tuple(index.columns))
        for table, _ in INDEXES
        for index in db.get_indexes(table)
    }


def test_scale_indexes_exist_on_new_and_older_databases(cfg):
    db = open_database(cfg, migrate_schema=True)
    try:
        with db.connection_context():
            assert set(INDEXES) <= _present(db)
            # An older database: created before these indexes existed.
            for table, columns in INDEXES:
                for index in db.get_indexes(table):
                    if tuple(index.columns) == columns:
                        db.execute_sql(f'DROP INDEX "{index.name}"')
            db.execute_sql(
                f"DELETE FROM schema_version WHERE name = {db.param}",
                ("m0003_scale_indexes",),
            )
            assert not set(INDEXES) & _present(db)
        assert migrate(db) == ["m0003_scale_indexes"]
        with db.connection_context():
            assert set(INDEXES) <= _present(db)
        assert migrate(db) == []
    finally:
        getattr(db, "close_all", db.close)()


def test_the_partial_resent_index_is_added_when_missing(cfg):
    from daemon.store.migrations.m0005_resent_index import INDEX

    db = open_database(cfg, migrate_schema=True)
    try:
        with db.connection_context():
            names = {index.name for index in db.get_indexes("message")}
            assert INDEX in names
            db.execute_sql(f'DROP INDEX "{INDEX}"')
            db.execute_sql(
                f"DELETE FROM schema_version WHERE name = {db.param}",
                ("m0005_resent_index",),
            )
        assert migrate(db) == ["m0005_resent_index"]
        with db.connection_context():
            assert INDEX in {index.name for index in db.get_indexes("message")}
    finally:
        getattr(db, "close_all", db.close)()
