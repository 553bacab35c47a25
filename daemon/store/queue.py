"""One Huey instance per queue, on the configured backend.

Huey pops destructively: a task whose worker dies is gone. That is fine here
because a task carries only an id, and the row it names (with its lease and
next_attempt_at) is what the sweeper re-enqueues. So results are off: nothing
reads them, and on Redis they would grow forever.

SQLite has no blocking pop: an enqueue pokes the queue's idle consumers
(daemon/store/wakeup.py) and a consumer that `listen`s waits for a poke,
with the poll (`queue.poll_max_s`) kept as a fallback.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import zlib
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

from huey import Huey
from huey import PostgresHuey
from huey import PriorityRedisHuey
from huey import SqliteHuey
from huey.storage import SqliteStorage

from daemon.config import Config
from daemon.store.wakeup import Poker
from daemon.store.wakeup import Waiter
from daemon.store.wakeup import wake_dir

log = logging.getLogger(__name__)

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


class WakingSqliteStorage(SqliteStorage):
    """SqliteStorage whose enqueues wake the queue's idle consumers.

    A consumer opts in with `listen(fallback_s)`: its empty dequeue then
    waits on its thread's wake socket for at most `fallback_s`, and Huey,
    told the storage blocks, does not sleep between dequeues (as with
    Redis's BZPOPMIN). Any other dequeue (tests, tools) returns at once.
    """

    # Set on a consumer's queue (`tell_taken`): called with each task's data
    # inside the transaction that takes it off the queue.
    on_taken: Callable[[bytes], None] | None = None

    def __init__(self, name="huey", filename="huey.db", **kwargs):
        super().__init__(name, filename=filename, **kwargs)
        self.poker = Poker(wake_dir(filename, name))
        self._fallback_s = 0.0
        self._stopping = False
        self._local = threading.local()
        self._waiters: set[Waiter] = set()
        self._waiters_lock = threading.Lock()

    def enqueue(self, data, priority=None):
        super().enqueue(data, priority)
        self.poke()

    def poke(self) -> None:
        """After a committed insert: every idle consumer looks at the queue."""
        self.poker.poke()

    def listen(self, fallback_s: float) -> None:
        self._fallback_s = fallback_s
        self.blocking = True

    def dequeue(self):
        if not self.blocking:
            return self._take()
        try:
            waiter = self._waiter()
        except OSError as exc:
            # No socket, no wake-up: Huey polls as it would without us.
            log.warning("queue %s: no wake socket (%s); polling", self.name, exc)
            self.blocking = False
            return self._take()
        # Drained before the look, so a task committed after it leaves a
        # poke that ends the wait below at once.
        waiter.drain()
        data = self._take()
        if data is None and not self._stopping:
            if not waiter.wait(self._fallback_s) and not waiter.bound():
                self.close_waiter()  # its socket was removed: a new one next time
        return data

    def _take(self):
        """SqliteStorage.dequeue (the same statements), telling `on_taken`
        before the commit: a process killed at any point either leaves the
        task in the queue or has noted that it took it."""
        if not self.on_taken:
            return super().dequeue()
        if not self.sql(
            "select 1 from task where queue = ? limit 1", (self.name,), results=True
        ):
            return None
        with self.db(commit=True) as curs:
            curs.execute(
                "select id, data from task where queue = ? "
                "order by priority desc, id limit 1",
                (self.name,),
            )
            row = curs.fetchone()
            if row is None:
                return None
            curs.execute("delete from task where id = ?", (row[0],))
            if curs.rowcount != 1:
                return None
            self.on_taken(row[1])
            return row[1]

    def _waiter(self) -> Waiter:
        waiter = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = Waiter(self.poker.directory)
            with self._waiters_lock:
                self._waiters.add(waiter)
        return waiter

    def close_waiter(self) -> None:
        """The calling thread's socket, removed (a consumer thread's exit)."""
        waiter = getattr(self._local, "waiter", None)
        if waiter is not None:
            self._local.waiter = None
            with self._waiters_lock:
                self._waiters.discard(waiter)
            waiter.close()

    def stop_waiting(self) -> None:
        """End every wait of this process now (the consumer is stopping)."""
        self._stopping = True
        with self._waiters_lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.wake()


class _SqliteHuey(_NoRevocation, SqliteHuey):
    storage_class = WakingSqliteStorage


class _TellsTaken:
    """A Huey whose consumers tell `on_taken` each task's data as soon as the
    backend hands it over (Redis, PostgreSQL: the pop is already committed
    there, so a process killed before this call loses the task to the
    sweeper; the window is a few microseconds, not the task's start-up)."""

    on_taken: Callable[[bytes], None] | None = None

    def dequeue(self):
        data = self.storage.dequeue()
        if data is None:
            return None
        if self.on_taken:
            self.on_taken(data)
        return self.deserialize_task(data)


class _PriorityRedisHuey(_TellsTaken, _NoRevocation, PriorityRedisHuey):
    pass


class _PostgresHuey(_TellsTaken, _NoRevocation, PostgresHuey):
    pass


def tell_taken(huey: Huey, on_taken: Callable[[bytes], None]) -> None:
    """Have this process's consumers of `huey` call `on_taken(data)` with each
    task they take off the queue, in the thread that will run it: inside the
    transaction that takes it (SQLite), else as soon as it arrives. Huey
    drops a popped task; the caller notes it so a death can replay it.
    `on_taken` must not raise (SQLite would give the task back, forever)."""
    if isinstance(huey.storage, WakingSqliteStorage):
        huey.storage.on_taken = on_taken
    else:
        huey.on_taken = on_taken


def listen_for_wakeups(huey: Huey, fallback_s: float) -> bool:
    """Make a consumer of `huey` wait for enqueues instead of polling, with
    a poll every `fallback_s`; False for the backends that block already."""
    storage = huey.storage
    if not isinstance(storage, WakingSqliteStorage):
        return False
    storage.listen(fallback_s)
    # Huey runs shutdown hooks in each worker thread as it exits.
    huey.on_shutdown("campaignd:wake-socket")(storage.close_waiter)
    return True


def waiting_ids(
    hueys: Iterable[Huey], kinds: dict[str, str], kind: str, limit: int
) -> set[int] | None:
    """The ids that the entries waiting in `hueys` (queued or scheduled) name
    for tasks of `kind` (`kinds` maps a task's function name to its kind; its
    first argument is an id or a list of ids). None when one of them holds
    more than `limit` entries: reading them all on every death would cost
    more than the sweeper's grace saves."""
    ids: set[int] = set()
    for huey in hueys:
        if huey.pending_count() + huey.scheduled_count() > limit:
            return None
        storage = huey.storage
        for data in [*storage.enqueued_items(), *storage.scheduled_items()]:
            try:
                task = task_target(huey, data, kinds)
            except Exception:  # noqa: BLE001 - not ours to judge: skip it
                continue
            if task is not None and task.kind == kind:
                ids.update(task.ids)
    return ids


@dataclass(frozen=True)
class TaskTarget:
    kind: str
    ids: list[int]
    eta: dt.datetime | None  # naive UTC, as our queues' Huey keeps it


def task_target(huey: Huey, data: bytes, kinds: dict[str, str]) -> TaskTarget | None:
    """What a queue entry is for: the kind its task's function name has in
    `kinds`, and the ids its first argument names (an id or a list of
    ids); None for a task `kinds` does not name or one without arguments.
    Raises what Huey's deserializer raises on data it cannot read."""
    message = huey.serializer.deserialize(data)
    kind = kinds.get(message.name.rpartition(".")[2])
    if not kind or not message.args:
        return None
    first = message.args[0]
    return TaskTarget(
        kind, [first] if isinstance(first, int) else list(first), message.eta
    )


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
        import redis
        from redis import ConnectionPool
        from redis import DriverInfo
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
            # With the version given, a new connection does not look
            # redis-py's own up in the installed packages' metadata: 3 ms in
            # each fresh process, paid by the first task a respawned worker
            # takes (W3; bench/respawn_steps.py) or the first webhook after
            # a respawned web role.
            driver_info=DriverInfo(lib_version=redis.__version__),
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
