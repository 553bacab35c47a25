"""One Huey instance per queue, on the configured backend.

Huey pops destructively: a task whose worker dies is gone. That is fine here
because a task carries only an id, and the row it names (with its lease and
next_attempt_at) is what the sweeper re-enqueues. So results are off: nothing
reads them, and on Redis they would grow forever.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from urllib.parse import urlparse

from huey import Huey
from huey import PostgresHuey
from huey import PriorityRedisHuey
from huey import SqliteHuey

from daemon.config import Config

QUEUE_NAMES = ("default", "messages", "retry", "verification")
# Message 2 answers a person who is waiting: it jumps the Message 1 backlog.
PRIORITY_HIGH = 10
PRIORITY_NORMAL = 0
QUEUE_SCHEMA_LOCK_ID = zlib.crc32(b"campaignd:queue-schema")


@dataclass(frozen=True)
class Queues:
    default: Huey
    messages: Huey
    retry: Huey
    verification: Huey

    def get(self, name: str) -> Huey:
        return getattr(self, name)

    def all(self) -> list[Huey]:
        return [self.get(name) for name in QUEUE_NAMES]

    def depths(self) -> dict[str, int]:
        """Pending plus scheduled entries per queue (raises if unreachable)."""
        return {
            name: self.get(name).pending_count() + self.get(name).scheduled_count()
            for name in QUEUE_NAMES
        }

    def close(self) -> None:
        for huey in self.all():
            close = getattr(huey.storage, "close", None)
            if close:
                close()


class _NoRevocation:
    """We never revoke tasks (rows are cancelled instead), so skip Huey's two
    revocation round trips per task (a peek before, a delete after)."""

    def is_revoked(self, task, timestamp=None, peek=True):
        return False

    def delete(self, key):
        if key.startswith("r:"):
            return False
        return super().delete(key)


class _SqliteHuey(_NoRevocation, SqliteHuey):
    pass


class _PriorityRedisHuey(_NoRevocation, PriorityRedisHuey):
    pass


class _PostgresHuey(_NoRevocation, PostgresHuey):
    pass


def make_queues(cfg: Config) -> Queues:
    if cfg.queue.backend == "postgres":
        return _postgres_queues(cfg)
    return Queues(**{name: _make_huey(cfg, name) for name in QUEUE_NAMES})


def _postgres_queues(cfg: Config) -> Queues:
    """PostgresHuey creates its tables with CREATE TABLE IF NOT EXISTS, which
    races between processes on a fresh database (a pg_type unique violation):
    create them under an advisory lock, like the schema migrations."""
    import psycopg

    with psycopg.connect(_libpq_dsn(cfg.queue_url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (QUEUE_SCHEMA_LOCK_ID,))
        try:
            return Queues(**{name: _make_huey(cfg, name) for name in QUEUE_NAMES})
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (QUEUE_SCHEMA_LOCK_ID,))


def _make_huey(cfg: Config, queue: str) -> Huey:
    # Redis strips everything but [A-Za-z0-9_] from names: keep them distinct.
    name = f"{cfg.queue.name_prefix}_{queue}"
    common = {"results": False, "utc": True}
    backend = cfg.queue.backend
    if backend == "sqlite":
        from pathlib import Path

        Path(cfg.queue_url).parent.mkdir(parents=True, exist_ok=True)
        # fsync off: a queue entry lost to a power cut is found again by
        # the sweeper (the row is the truth), and every commit is cheaper.
        return _SqliteHuey(
            name,
            filename=cfg.queue_url,
            journal_mode="wal",
            fsync=False,
            timeout=10,
            **common,
        )
    if backend == "redis":
        from redis import ConnectionPool
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry

        # Huey builds a bare ConnectionPool with no retries; a pool of our
        # own retries a dropped or refused connection with backoff (about
        # 1.5 s in all) instead of failing the worker loop on the first blip.
        # Timeouts are not retried: a hung Redis costs one socket timeout per
        # command, not six (the web role's enqueuer, which must give up
        # within web.enqueue_timeout_s, and /readyz wait that long at most).
        pool = ConnectionPool.from_url(
            cfg.queue_url,
            retry=Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=1.0),
                5,
                supported_errors=(RedisConnectionError,),
            ),
            socket_connect_timeout=2,
            # Must exceed Huey's blocking read_timeout (1 s), or a BZPOPMIN'd
            # item can be lost between Redis and us.
            socket_timeout=5,
            health_check_interval=30,
        )
        return _PriorityRedisHuey(name, connection_pool=pool, **common)
    if backend == "postgres":
        return _PostgresHuey(name, dsn=_libpq_dsn(cfg.queue_url), **common)
    raise AssertionError(backend)


def _libpq_dsn(url: str) -> str:
    parts = urlparse(url)
    if parts.scheme == "postgres":
        return url.replace("postgres://", "postgresql://", 1)
    return url
