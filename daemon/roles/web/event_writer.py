"""The webhook event writer: group commit, then enqueue off the request path.

Request threads hand their rows to one EventWriter thread, which inserts all
that is waiting in one transaction, commits, and answers each request with
what it stored: a 2xx means committed. The new event ids then go to the
Enqueuer's thread, which enqueues their processing on the 'default' queue
after the answers (webhooks.py has the request side).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import queue
import threading
import time

import peewee as pw

from daemon import metrics
from daemon.store.db import DURABLE_SYNCHRONOUS
from daemon.store.db import drop_connection
from daemon.store.db import is_postgres
from daemon.store.db import set_synchronous
from daemon.store.models import InboundEvent
from daemon.store.models import database

log = logging.getLogger(__name__)

# Rows per INSERT: Meta batches up to 1000 entries in one POST.
_INSERT_CHUNK = 200

_COLUMNS = (
    "provider",
    "dedupe_key",
    "event_type",
    "payload",
    "received_at",
    "attempts",
)


@functools.lru_cache(maxsize=16)
def _insert_sql(count: int, param: str, returning: bool = True) -> str:
    """INSERT of `count` events, skipping known keys; returns id, type and key
    (unless `returning` is false: see _insert_sqlite).

    Hand-written because building the peewee query cost more than the insert
    itself (0.6 ms a request); the text is the same on SQLite >= 3.35 and PG.
    """
    meta = InboundEvent._meta
    columns = ", ".join(meta.fields[name].column_name for name in _COLUMNS)
    row = "(" + ", ".join([param] * len(_COLUMNS)) + ")"
    return (
        f"INSERT INTO {meta.table_name} ({columns}) VALUES "
        + ", ".join([row] * count)
        + " ON CONFLICT DO NOTHING"
        + (" RETURNING id, event_type, dedupe_key" if returning else "")
    )


# From here on the ids are read back: near the largest rowid SQLite picks
# new ones at random, and they are no longer consecutive.
_READ_BACK_FROM_ID = 2**62

_STORED_SQL = (
    "SELECT json_group_array(json_array(id, event_type, dedupe_key))"
    " FROM inbound_event WHERE id BETWEEN ? AND ?"
)


def _insert_sqlite(chunk: list[dict], params: list) -> list:
    """SQLite: the INSERT without RETURNING, then the rows it added in one
    row of JSON. Python's sqlite3 gives up the GIL on every step, that is on
    every row RETURNING hands back, and under a load of request threads the
    writer waits to take it back each time (profiled at most of its time).
    The INSERT runs in one step, and the rows one INSERT adds get
    consecutive ids ending at the last one (rowid = max + 1, under the write
    lock the statement holds), in the order of its VALUES."""
    cursor = database.execute_sql(_insert_sql(len(chunk), "?", False), params)
    added, last = cursor.rowcount, cursor.lastrowid
    if added <= 0:
        return []
    if added == len(chunk) and last < _READ_BACK_FROM_ID:
        # Every row was new (the usual case): their ids are known without
        # the SELECT, a statement less for the writer to take the GIL back.
        first = last - added + 1
        return [
            (first + i, row["event_type"], row["dedupe_key"])
            for i, row in enumerate(chunk)
        ]
    (text,) = database.execute_sql(_STORED_SQL, (last - added + 1, last)).fetchone()
    found = json.loads(text)
    if len(found) != added:
        # Only if SQLite ran out of rowids and picked them at random: the
        # rows are stored all the same; those not found here are not
        # enqueued now, and the sweeper replays them.
        log.error("%d of %d new events not found by id", added - len(found), added)
    return found


class _LazyThread:
    """A daemon thread running `target`, started by the first request that
    needs it, and again by the next one if it ever died: no request waits on
    a thread that is gone."""

    def __init__(self, target, name: str):
        self._target = target
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._target, name=self._name, daemon=True
                    )
                    self._thread.start()


class Enqueuer:
    """Hands stored events to the processing queue, off the request path.

    The EventWriter answers its requests right after the commit, then drops
    the new event ids here; `submit` never blocks (when the hand-over queue is
    full the ids are left to the sweeper). One thread enqueues them in tasks of
    TASK_CHUNK events, every task of a round (all that is waiting, rounds at
    least ROUND_GAP_S apart) in one call: one transaction or Redis command
    however many tasks (a call per task cost the web process 60-110 us a
    request at W2's load: bench/webhook_ingest.py --store db,unqueued).
    Events not enqueued within `timeout_s` of their commit, and those of a
    round the queue backend refuses (the backend is down), stay unprocessed
    in inbound_event, where the sweeper finds them (campaigns.sweep, older
    than its grace). One Redis command cannot hold this thread longer than
    the pool's socket timeout (daemon/store/queue.py), so the time limit is
    overrun by one command at most.
    """

    # Events per processing task: a batch is split so that both threads of
    # worker:default share it.
    TASK_CHUNK = 8
    # Batches handed over and not yet enqueued (each one group commit).
    MAX_WAITING = 1024
    # Rounds start at least this far apart. A round costs the web process
    # about the same however many events it holds (a transaction or a Redis
    # call, and the GIL taken back after each), so under load fewer, larger
    # rounds leave the requests more CPU (bench/webhook_ingest.py --by-thread:
    # the enqueuer's CPU a request halved). The first events after a quiet
    # spell go at once; under load an event waits 20 ms more at most.
    ROUND_GAP_S = 0.02

    def __init__(self, tasks, timeout_s: float = 2.0):
        self.tasks = tasks
        self.timeout_s = timeout_s
        self._waiting: queue.Queue = queue.Queue(maxsize=self.MAX_WAITING)
        self._thread = _LazyThread(self._run, "event-enqueuer")

    def submit(self, event_ids: list[int]) -> None:
        """Enqueue `event_ids` soon, in the background; never blocks."""
        if not event_ids:
            return
        self._thread.ensure()
        try:
            self._waiting.put_nowait((time.monotonic() + self.timeout_s, event_ids))
        except queue.Full:
            log.warning(
                "%d stored events not enqueued (enqueue backlog full); "
                "the sweeper will replay them",
                len(event_ids),
            )

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted has been enqueued or given up."""
        done = self._waiting.all_tasks_done
        with done:
            return done.wait_for(lambda: not self._waiting.unfinished_tasks, timeout)

    def _run(self) -> None:
        last_round = 0.0
        while True:
            batches = [self._waiting.get()]
            # Under load, what arrives during the gap joins this round.
            gap = last_round + self.ROUND_GAP_S - time.monotonic()
            if gap > 0:
                time.sleep(gap)
            last_round = time.monotonic()
            while True:
                try:
                    batches.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                self._enqueue(batches)
            except Exception:  # noqa: BLE001 - this thread must outlive any bug
                log.exception("enqueueing stored events failed")
            finally:
                for _ in batches:
                    self._waiting.task_done()

    def _enqueue(self, batches: list[tuple[float, list[int]]]) -> None:
        """Enqueue one round: every batch waiting, in tasks of TASK_CHUNK
        events, all in one call (one transaction or one Redis command)."""
        now = time.monotonic()
        late = [i for deadline, ids in batches if deadline <= now for i in ids]
        ids = [i for deadline, ids in batches if deadline > now for i in ids]
        chunks = [
            ids[start : start + self.TASK_CHUNK]
            for start in range(0, len(ids), self.TASK_CHUNK)
        ]
        if chunks:
            try:
                self.tasks.enqueue_event_chunks(chunks)
            except Exception as exc:  # noqa: BLE001 - the rows are stored
                log.warning(
                    "queue unavailable (%s: %s): %d stored events (ids %d..%d) "
                    "not enqueued; the sweeper will replay them",
                    type(exc).__name__,
                    exc,
                    len(ids),
                    min(ids),
                    max(ids),
                )
        if late:
            log.warning(
                "%d stored events (ids %d..%d) not enqueued within %.1f s; "
                "the sweeper will replay them",
                len(late),
                min(late),
                max(late),
                self.timeout_s,
            )


class _WriteRequest:
    """One request's rows and its wait: a lock held until the writer has set
    the outcome. (A Future is a Condition, an RLock and a lock a wait: under
    W2's load, switches and GIL hand-overs the request threads pay.)"""

    __slots__ = ("rows", "stored", "error", "done")

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.stored: list[tuple[int, str]] = []
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


class EventWriter:
    """Group commit: one thread stores the events of every waiting request.

    SQLite has one writer at a time, and a commit per request leaves the
    other request threads queueing for the lock (or sleeping in SQLite's
    busy handler). Here request threads hand their rows over and wait; the
    writer inserts everything that is waiting in ONE transaction, commits,
    drops the new event ids into the Enqueuer's hand-over queue (never
    blocking) and wakes each request with its own result: the answer comes
    right after the commit, so "2xx means stored" holds, and no answer waits
    on the queue. A failed transaction fails every request in it (each gets
    503).

    On SQLite the writer's own connection commits with synchronous=FULL
    (`sqlite_synchronous`): in WAL mode one fsync of the WAL per group commit,
    so an acknowledged event survives a power cut, not only a crash.
    """

    # Requests folded into one transaction at most.
    MAX_BATCH = 256
    # PRAGMA synchronous of the writer's SQLite connection (the benchmark
    # sets "normal" to measure what durability costs).
    sqlite_synchronous = DURABLE_SYNCHRONOUS

    def __init__(
        self, tasks, timeout_s: float = 30.0, enqueue_timeout_s: float | None = None
    ):
        self.tasks = tasks
        self.timeout_s = timeout_s
        if enqueue_timeout_s is None:
            cfg = getattr(tasks, "cfg", None)
            web = getattr(cfg, "web", None)
            enqueue_timeout_s = getattr(web, "enqueue_timeout_s", 2.0)
        self.enqueuer = Enqueuer(tasks, enqueue_timeout_s)
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = _LazyThread(self._run, "event-writer")

    def store(self, rows: list[dict]) -> list[tuple[int, str]]:
        """Insert `rows` (one request's, skipping known keys); the (id,
        event_type) stored. The request and its new events are counted in
        /metrics (WEBHOOK_REQUESTS, WEBHOOK_EVENTS) when they commit."""
        if not rows:
            return []
        self._thread.ensure()
        request = _WriteRequest(rows)
        self._pending.put(request)
        if not request.done.acquire(timeout=self.timeout_s):
            # The database is stuck (nothing else runs in that thread): a
            # 503, and the provider delivers again (deduplicated if it landed;
            # a late commit counts the request as stored as well).
            raise pw.OperationalError(
                f"event writer did not commit within {self.timeout_s:g} s"
            )
        if request.error is not None:
            raise request.error
        return request.stored

    def _run(self) -> None:
        while True:
            batch = [self._pending.get()]
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[_WriteRequest]) -> None:
        started = time.perf_counter()
        try:
            stored = self._store([row for request in batch for row in request.rows])
        except Exception as exc:  # noqa: BLE001 - handed to each request
            for request in batch:
                request.error = exc
                request.done.release()
            return
        try:
            metrics.WEBHOOK_COMMIT_SECONDS.observe(time.perf_counter() - started)
            self._hand_over(batch, stored)
        except Exception:  # noqa: BLE001 - committed: answer, do not hang
            # A bug past the commit would otherwise end this thread and leave
            # every request of the group waiting timeout_s for a 503. Their
            # events are stored; what was not handed to the Enqueuer is the
            # sweeper's, and a request left without its ids is answered as
            # holding no new event.
            log.exception("event writer: handing over a committed group failed")
        finally:
            for request in batch:
                request.done.release()

    def _hand_over(
        self, batch: list[_WriteRequest], stored: dict[str, tuple[int, str, str]]
    ) -> None:
        """Each request's new events, the Enqueuer's ids, the counts."""
        # Handed over (a put that never blocks) before the answers, so that
        # Enqueuer.wait_idle after an answer covers its events; the enqueue
        # itself runs in the Enqueuer's thread, after and apart from them.
        self.enqueuer.submit([event_id for event_id, _, _ in stored.values()])
        requests: collections.Counter = collections.Counter()
        events: collections.Counter = collections.Counter()
        for request in batch:
            provider = request.rows[0]["provider"]
            mine = []
            for row in request.rows:
                hit = stored.pop(row["dedupe_key"], None)
                if hit is not None:
                    mine.append((hit[0], hit[1]))
                    events[provider, metrics.event_label(hit[1])] += 1
            requests[provider, "stored" if mine else "duplicate"] += 1
            request.stored = mine
        # Counted once a group, before the answers (a scrape after an answer
        # sees it): under the supervisor each increment is a write to a
        # shared file under one lock, which every request thread took three
        # times a webhook.
        for labels, count in requests.items():
            metrics.labelled(metrics.WEBHOOK_REQUESTS, *labels).inc(count)
        for labels, count in events.items():
            metrics.labelled(metrics.WEBHOOK_EVENTS, *labels).inc(count)

    def _store(self, rows: list[dict]) -> dict[str, tuple[int, str, str]]:
        """The rows inserted on the writer's own connection, kept open.

        SQLite: closing the last connection checkpoints and deletes the WAL,
        which the next commit pays for again (~12 ms). PostgreSQL: a pooled
        connection taken for each group costs a round trip of its own (the
        pool's SELECT 1 that checks it), so the writer keeps one; when it
        breaks (a restart, a cut), the group is tried once more on a new one.
        The INSERT skips known keys, so a retry stores nothing twice; if the
        broken attempt did commit, its events are answered as duplicates and
        the sweeper enqueues them.
        """
        if not is_postgres():
            if database.connect(reuse_if_open=True):
                set_synchronous(database, self.sqlite_synchronous)
            return self._insert(rows)
        try:
            database.connect(reuse_if_open=True)
            return self._insert(rows)
        except (pw.OperationalError, pw.InterfaceError):
            drop_connection()
        try:
            database.connect()
            return self._insert(rows)
        except Exception:
            drop_connection()
            raise

    def _insert(self, rows: list[dict]) -> dict[str, tuple[int, str, str]]:
        stored: dict[str, tuple[int, str, str]] = {}
        sqlite = not is_postgres()
        # One INSERT is atomic by itself (peewee runs in autocommit): a batch
        # that fits in one commits in its own statement, without a BEGIN and
        # a COMMIT, each a round trip on PostgreSQL and on both a call that
        # gives up the GIL and waits to take it back (see _insert_sqlite).
        alone = len(rows) <= _INSERT_CHUNK
        with contextlib.nullcontext() if alone else database.atomic():
            for start in range(0, len(rows), _INSERT_CHUNK):
                chunk = rows[start : start + _INSERT_CHUNK]
                params = [row[column] for row in chunk for column in _COLUMNS]
                if sqlite:
                    found = _insert_sqlite(chunk, params)
                else:
                    cursor = database.execute_sql(
                        _insert_sql(len(chunk), database.param), params
                    )
                    found = cursor.fetchall()
                for event_id, event_type, key in found:
                    stored[key] = (event_id, event_type, key)
        return stored
