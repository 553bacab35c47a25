"""Open the database for the configured mode and bring its schema up to date.

Embedded mode is a SQLite file in WAL mode with IMMEDIATE write transactions
(DEFERRED ones hit SQLITE_BUSY_SNAPSHOT, which ignores the busy timeout).
Cluster mode is PostgreSQL through peewee's pool on psycopg 3. Each process
opens its own connections after exec; nothing is shared across fork.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import random
import sqlite3
import time
import zlib
from pathlib import Path

import peewee as pw

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.store import migrations as migrations_pkg
from daemon.store.models import database

log = logging.getLogger(__name__)

# Any constant shared by all campaignd processes; hashed from a name so it is
# unlikely to collide with another application's advisory locks.
MIGRATION_LOCK_ID = zlib.crc32(b"campaignd:migrations")

# SQLite commits with synchronous=NORMAL: in WAL mode a crash of the process
# loses nothing, a power cut may undo the last commits. Writes that we
# acknowledge to someone outside (webhooks: "2xx means stored") use FULL on
# their connection instead: one fsync of the WAL per commit.
DEFAULT_SYNCHRONOUS = "normal"
DURABLE_SYNCHRONOUS = "full"


def open_database(cfg: Config, *, migrate_schema: bool = False) -> pw.Database:
    """Connect the models to the configured database (once per process)."""
    db = make_database(cfg.database_url, cfg)
    database.initialize(db)
    if migrate_schema:
        migrate(db)
    return db


def close_database(db: pw.Database) -> None:
    """Close this thread's connection and, on pooled PostgreSQL, the pool's
    idle ones: nothing is held afterwards."""
    if not db.is_closed():
        db.close()
    close_all = getattr(db, "close_all", None)
    if close_all:
        close_all()


def make_database(url: str, cfg: Config | None = None) -> pw.Database:
    busy = cfg.database.busy_timeout_s if cfg else 10.0
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        _switch_to_wal(path, busy)
        return pw.SqliteDatabase(
            str(path),
            timeout=busy,
            lock_type="IMMEDIATE",
            pragmas={
                "synchronous": DEFAULT_SYNCHRONOUS,
                "busy_timeout": int(busy * 1000),
                "foreign_keys": 1,
            },
        )
    if url.startswith(("postgresql://", "postgres://")):
        # Imported here: psycopg costs ~0.3 s of start-up that embedded mode
        # (and every respawn there) does not need to pay.
        from playhouse.postgres_ext import PooledPsycopg3Database

        params = postgres_params(url)
        return PooledPsycopg3Database(
            params.pop("dbname"),
            **params,
            max_connections=cfg.database.max_connections if cfg else 8,
            stale_timeout=300,
            timeout=10,
        )
    raise ConfigError(f"database.url: unsupported URL {url!r}")


def postgres_params(url: str) -> dict:
    """libpq connection parameters of a postgresql:// URL, every option kept.

    libpq itself parses the URL, so `?sslmode=require`, `application_name`,
    `connect_timeout`, a `host=/run/postgresql` socket directory... all reach
    the server. Where the URL says nothing we keep our defaults: TCP to
    127.0.0.1, database "postgres", and a 5 s connect timeout, so a dead
    server cannot hang a worker past its soft limit.
    """
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(
            "database.url: PostgreSQL needs the psycopg driver, not installed: "
            "pip install 'campaignd[postgres]'"
        ) from None
    import psycopg

    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        # libpq's message names the bad part (a port, an unknown option).
        raise ConfigError(f"database.url: {str(exc).strip()}") from None
    params.setdefault("host", "127.0.0.1")
    params.setdefault("dbname", "postgres")
    params.setdefault("connect_timeout", 5)
    return params


def _switch_to_wal(path: Path, busy_s: float) -> None:
    """Put the file in WAL mode once (the mode is stored in the file).

    Two processes switching a fresh file at the same moment: SQLite answers
    one of them "database is locked" at once, ignoring the busy timeout, so
    this retries until the timeout instead of failing a child at start.
    """
    deadline = time.monotonic() + busy_s
    while True:
        try:
            with contextlib.closing(sqlite3.connect(str(path), timeout=busy_s)) as conn:
                conn.execute("PRAGMA journal_mode = wal")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.05)


def set_synchronous(db, level: str = DURABLE_SYNCHRONOUS) -> None:
    """SQLite: PRAGMA synchronous for this thread's open connection only.

    PostgreSQL: nothing; campaignd never turns synchronous_commit off, so
    every commit there is flushed (unless the server is configured otherwise).
    """
    if not is_postgres(getattr(db, "obj", db)):
        db.execute_sql(f"PRAGMA synchronous = {_SYNCHRONOUS_LEVELS[level.lower()]}")


_SYNCHRONOUS_LEVELS = {
    "off": "OFF",
    "normal": "NORMAL",
    "full": "FULL",
    "extra": "EXTRA",
}


def is_postgres(db: pw.Database | None = None) -> bool:
    db = db or database.obj
    return isinstance(db, pw.PostgresqlDatabase)


def migrate(db: pw.Database) -> list[str]:
    """Apply every migration not yet recorded; safe when many start at once."""
    applied = []
    with db.connection_context():
        if isinstance(db, pw.PostgresqlDatabase):
            # Session-level advisory lock: other hosts wait here until we
            # are done, then find nothing left to apply.
            db.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
            try:
                applied = _apply_pending(db)
            finally:
                db.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
        else:
            # SQLite DDL is transactional: one IMMEDIATE transaction holds the
            # write lock across the check and the changes.
            applied = _apply_pending(db)
    for name in applied:
        log.info("applied migration %s", name)
    return applied


def _apply_pending(db: pw.Database) -> list[str]:
    applied = []
    with db.atomic():
        db.execute_sql(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(name VARCHAR(100) PRIMARY KEY, applied_at TIMESTAMP)"
        )
        done = {row[0] for row in db.execute_sql("SELECT name FROM schema_version")}
        for name in migration_names():
            if name in done:
                continue
            module = importlib.import_module(f"{migrations_pkg.__name__}.{name}")
            module.up(db)
            db.execute_sql(
                "INSERT INTO schema_version (name, applied_at) "
                f"VALUES ({db.param}, CURRENT_TIMESTAMP)",
                (name,),
            )
            applied.append(name)
    return applied


def migration_names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(migrations_pkg.__path__)
        if m.name.startswith("m")
    )


def pending_migrations(db: pw.Database) -> list[str] | None:
    """The migrations this code has and the database has not applied, in
    order; None for a database with no schema yet (one nothing runs on).

    Only reads, so a read-only database user can ask."""
    with db.connection_context():
        if not db.table_exists("schema_version"):
            return None
        done = {r[0] for r in db.execute_sql("SELECT name FROM schema_version")}
    return [name for name in migration_names() if name not in done]


def schema_versions(db: pw.Database) -> list[str]:
    with db.connection_context():
        return [r[0] for r in db.execute_sql("SELECT name FROM schema_version")]


@contextlib.contextmanager
def db_session(close_idle: bool = False):
    """Use this thread's open connection, or open one for the block and close it.

    Closing what we opened returns it to the PostgreSQL pool, which drops
    broken connections: a database restart costs one failed call, not a
    thread stuck on a dead connection forever. `close_idle` also closes the
    pool's idle connections, so a process that uses the database now and
    then (the supervisor) holds none between uses.
    """
    opened = database.is_closed()
    if opened:
        database.connect()
    try:
        yield
    finally:
        if opened:
            database.close()
            idle = getattr(database.obj, "close_idle", None) if close_idle else None
            if idle:
                idle()


def drop_connection() -> None:
    """This thread's connection, which the database broke (a restart, a cut):
    closed, so that its next query reconnects instead of failing on "the
    connection is closed" forever."""
    try:
        manual_close = getattr(database.obj, "manual_close", None)
        if manual_close is not None:
            manual_close()  # a pooled connection: closed, not returned
        else:
            database.close()
    except Exception:  # noqa: BLE001 - it is already broken
        log.debug("dropping a broken connection failed", exc_info=True)
