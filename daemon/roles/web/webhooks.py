"""Provider webhooks: verify, persist, then acknowledge.

A 2xx means "stored": each event of the POST is inserted into inbound_event
under a unique dedupe key and committed before we answer, so a provider that
retries a delivery we already have gets a 2xx and changes nothing, and a
database we cannot write gets a 503 (the provider retries later). On SQLite
the webhook commits are durable (synchronous=FULL: one fsync per group
commit), so an acknowledged event also survives a power cut.

Processing happens on the 'default' queue, enqueued AFTER the answer by a
thread of its own (Enqueuer), within web.enqueue_timeout_s: a hung or refused
queue backend delays processing, never a webhook. What is not enqueued stays
unprocessed in inbound_event and the sweeper replays it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import falcon
import peewee as pw

from daemon import metrics
from daemon.config import Config
from daemon.providers import webhook_parser
from daemon.providers.base import as_text
from daemon.providers.base import storable_text
from daemon.providers.base import verify_hmac_sha256
from daemon.roles.web import parse_json_object
from daemon.roles.web import read_body
from daemon.store.db import DURABLE_SYNCHRONOUS
from daemon.store.db import drop_connection
from daemon.store.db import is_postgres
from daemon.store.db import set_synchronous
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

# Rows per INSERT: Meta batches up to 1000 entries in one POST.
_INSERT_CHUNK = 200
_KEY_LIMIT = 300  # inbound_event.dedupe_key
_TYPE_LIMIT = 60  # inbound_event.event_type


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


def event_type_of(provider: str, item: dict) -> str:
    """A short name for an event item: Wassenger's `event`, Meta's item kind."""
    if provider == "wassenger":
        return as_text(item.get("event")) or "unknown"
    if isinstance(item.get("message"), dict):
        return "message"
    status = item.get("status")
    if isinstance(status, dict):
        return f"status:{as_text(status.get('status')) or 'unknown'}"
    if "errors" in item:
        return "errors"
    return as_text(item.get("field")) or "unknown"


def storable_key(key: str) -> str:
    """The dedupe key as the column can hold it (long keys keep a hash tail)."""
    key = storable_text(key)[:10_000]
    if len(key) <= _KEY_LIMIT:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: _KEY_LIMIT - 65]}:{digest}"


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
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, event_ids: list[int]) -> None:
        """Enqueue `event_ids` soon, in the background; never blocks."""
        if not event_ids:
            return
        self._ensure_thread()
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

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="event-enqueuer", daemon=True
                    )
                    self._thread.start()

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
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def store(self, rows: list[dict]) -> list[tuple[int, str]]:
        """Insert `rows` (skipping known keys); the (id, event_type) stored."""
        if not rows:
            return []
        self._ensure_thread()
        request = _WriteRequest(rows)
        self._pending.put(request)
        if not request.done.acquire(timeout=self.timeout_s):
            # The database is stuck (nothing else runs in that thread): a
            # 503, and the provider delivers again (deduplicated if it landed).
            raise pw.OperationalError(
                f"event writer did not commit within {self.timeout_s:g} s"
            )
        if request.error is not None:
            raise request.error
        return request.stored

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="event-writer", daemon=True
                    )
                    self._thread.start()

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
        try:
            stored = self._store([row for request in batch for row in request.rows])
        except Exception as exc:  # noqa: BLE001 - handed to each request
            for request in batch:
                request.error = exc
                request.done.release()
            return
        # Handed over (a put that never blocks) before the answers, so that
        # Enqueuer.wait_idle after an answer covers its events; the enqueue
        # itself runs in the Enqueuer's thread, after and apart from them.
        self.enqueuer.submit([event_id for event_id, _, _ in stored.values()])
        for request in batch:
            mine = []
            for row in request.rows:
                hit = stored.pop(row["dedupe_key"], None)
                if hit is not None:
                    mine.append((hit[0], hit[1]))
            request.stored = mine
            request.done.release()

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


class WebhookIngest:
    """Persist-then-ack for one provider's payloads."""

    def __init__(
        self,
        provider: str,
        tasks,
        clock: Callable[[], Any] = utcnow,
        writer: EventWriter | None = None,
    ):
        self.provider = provider
        self.parser = webhook_parser(provider)
        self.clock = clock
        self.writer = writer or EventWriter(tasks)

    def ingest(self, body: dict, raw: bytes | None = None) -> tuple[int, int]:
        """Store every new event of `body` (parsed from `raw`, when given);
        (stored, duplicates)."""
        items = self.parser.split(body)
        now = self.clock()
        rows: dict[str, dict] = {}
        for key, item in items:
            key = storable_key(key)
            if key in rows:
                continue
            event_type = event_type_of(self.provider, item)
            rows[key] = {
                "provider": self.provider,
                "dedupe_key": key,
                "event_type": storable_text(event_type)[:_TYPE_LIMIT],
                "payload": _payload_text(item, body, raw),
                "received_at": now,
                "attempts": 0,
            }
        inserted = self.writer.store(list(rows.values()))
        for _, event_type in inserted:
            metrics.labelled(
                metrics.WEBHOOK_EVENTS, self.provider, metrics.event_label(event_type)
            ).inc()
        return len(inserted), len(items) - len(inserted)


def _payload_text(item: dict, body: dict, raw: bytes | None) -> str:
    """The JSON stored for an event item. A whole body (every Wassenger event)
    is stored as received: it decoded as UTF-8 and parsed as JSON, so it holds
    no NUL byte or lone surrogate and any database stores it (and encoding it
    again was a third of a webhook's Python). A part of a body (Meta's items)
    is encoded, ASCII-escaped, so any text the provider sends can be stored."""
    if item is body and raw is not None:
        return raw.decode("utf-8")
    return json.dumps(item, ensure_ascii=True, separators=(",", ":"))


def _unauthorized(provider: str, description: str) -> falcon.HTTPUnauthorized:
    metrics.labelled(metrics.WEBHOOK_REQUESTS, provider, "unauthorized").inc()
    return falcon.HTTPUnauthorized(title="Unauthorized", description=description)


def _secret_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(
        expected.encode(), given.encode("utf-8", "replace")
    )


def _verified_payload(
    req: falcon.Request, provider: str, secret: str, header: str
) -> tuple[dict, bytes]:
    """The JSON object of the body and the body, after checking its HMAC when
    `secret` is set."""
    raw = read_body(req)
    if secret and not verify_hmac_sha256(secret, raw, req.get_header(header)):
        raise _unauthorized(provider, f"missing or wrong {header} (sha256=<hex>)")
    try:
        return parse_json_object(raw, strict_text=False), raw
    except falcon.HTTPError:
        metrics.labelled(metrics.WEBHOOK_REQUESTS, provider, "invalid").inc()
        raise


def _acknowledge(resp: falcon.Response, provider: str, stored: int, dups: int):
    outcome = "stored" if stored else "duplicate"
    metrics.labelled(metrics.WEBHOOK_REQUESTS, provider, outcome).inc()
    # The JSON of resp.media, written out: falcon's media handler cost more
    # than the rest of the answer.
    resp.content_type = falcon.MEDIA_JSON
    resp.data = b'{"stored":%d,"duplicates":%d}' % (stored, dups)


class WassengerWebhook:
    """POST /webhooks/wassenger"""

    # The EventWriter thread does the database work, on its own connection.
    uses_database = False

    def __init__(self, cfg: Config, ingest: WebhookIngest):
        self.secret = cfg.web.webhook_secret
        self.hmac_secret = cfg.web.webhook_hmac_secret
        self.ingest = ingest

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.secret:
            given = req.get_header("X-Webhook-Secret") or req.get_param("token")
            if not _secret_matches(self.secret, given):
                raise _unauthorized(
                    "wassenger", "missing or wrong X-Webhook-Secret header / token"
                )
        body, raw = _verified_payload(
            req, "wassenger", self.hmac_secret, "X-Wassenger-Signature"
        )
        stored, dups = self.ingest.ingest(body, raw)
        _acknowledge(resp, "wassenger", stored, dups)


class MetaWebhook:
    """GET (verification handshake) and POST /webhooks/whatsapp"""

    # The EventWriter thread does the database work, on its own connection.
    uses_database = False

    def __init__(self, cfg: Config, ingest: WebhookIngest):
        self.verify_token = cfg.provider.verify_token
        self.app_secret = cfg.provider.app_secret
        # Meta cannot add headers; without an app secret the URL token is
        # what keeps strangers out.
        self.url_token = cfg.web.webhook_secret
        self.ingest = ingest

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        mode = req.get_param("hub.mode")
        token = req.get_param("hub.verify_token")
        challenge = req.get_param("hub.challenge") or ""
        if (
            mode != "subscribe"
            or not self.verify_token
            or not _secret_matches(self.verify_token, token)
        ):
            raise falcon.HTTPForbidden(
                title="Forbidden",
                description="hub.mode must be subscribe and hub.verify_token must "
                "match provider.verify_token",
            )
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = challenge

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self.app_secret and self.url_token:
            if not _secret_matches(self.url_token, req.get_param("token")):
                raise _unauthorized("meta", "missing or wrong ?token=")
        body, raw = _verified_payload(
            req, "meta", self.app_secret, "X-Hub-Signature-256"
        )
        stored, dups = self.ingest.ingest(body, raw)
        _acknowledge(resp, "meta", stored, dups)
