"""Webhook ingest over real HTTP (waitress on loopback), SQLite and PG+Redis.

Persist, then acknowledge: a 2xx only for what is committed, one row per
event however often (and however concurrently) it is delivered, a 503 when
the database cannot store.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests

from daemon.app.tasks import Tasks
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.conftest import PG_URL

pytestmark = pytest.mark.timeout(90)


def inbound(msg_id: str, phone: str = "+33612345678", body: str = "oui") -> dict:
    return {
        "id": msg_id,
        "object": "message",
        "event": "message:in:new",
        "created": 1765642500,
        "data": {
            "id": msg_id,
            "flow": "inbound",
            "ack": "delivered",
            "fromNumber": phone,
            "body": body,
            "timestamp": 1765642500,
        },
    }


class Web:
    def __init__(self, cfg, extra_cfg=None):
        self.cfg = cfg
        open_database(cfg, migrate_schema=True)
        database.close()
        self.queues = make_queues(cfg)
        self.app = create_app(cfg, Tasks(cfg, self.queues))
        self.server = WebServer(self.app, cfg, port=0)
        self.thread = self.server.serve_in_thread()
        self.url = self.server.url
        self.http = requests.Session()

    def post(self, path: str, payload, **kw) -> requests.Response:
        return self.http.post(self.url + path, json=payload, timeout=30, **kw)

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.thread.join(10)
        self.queues.close()
        database.close()


def event_count() -> int:
    with database.connection_context():
        return InboundEvent.select().count()


@pytest.fixture
def web_factory():
    started = []

    def start(cfg) -> Web:
        web = Web(cfg)
        started.append(web)
        return web

    yield start
    for web in started:
        web.close()


def test_duplicate_deliveries_store_one_row_and_enqueue_once(
    any_mode_config, web_factory
):
    web = web_factory(any_mode_config)
    replies = [web.post("/webhooks/wassenger", inbound("DUP1")) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert [r.json()["stored"] for r in replies] == [1, 0, 0]
    assert event_count() == 1
    assert web.app.wait_enqueued()  # the enqueue follows, in another thread
    assert web.queues.default.pending_count() == 1


def test_concurrent_deliveries_of_one_reply_store_one_row(any_mode_config, web_factory):
    web = web_factory(any_mode_config)
    barrier = threading.Barrier(5)

    def deliver(_):
        with requests.Session() as session:
            barrier.wait(timeout=10)
            return session.post(
                web.url + "/webhooks/wassenger", json=inbound("SAME"), timeout=30
            )

    for _round in range(3):
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(deliver, range(5)))
        assert [a.status_code for a in answers] == [200] * 5
    stored = sum(a.json()["stored"] for a in answers)
    assert stored == 0  # the last round only saw duplicates
    assert event_count() == 1
    assert web.app.wait_enqueued()  # the enqueue follows, in another thread
    assert web.queues.default.pending_count() == 1


def test_many_distinct_events_all_stored(any_mode_config, web_factory):
    web = web_factory(any_mode_config)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: web.post("/webhooks/wassenger", inbound(f"M{i}")), range(80)
            )
        )
    assert {a.status_code for a in answers} == {200}
    assert event_count() == 80
    # Processing is enqueued in batches; every stored event is in one.
    assert web.app.wait_enqueued()  # the enqueue follows, in another thread
    queued = [i for t in web.queues.default.pending() for i in t.args[0]]
    assert sorted(queued) == sorted(e.id for e in InboundEvent.select())


def outcomes(web) -> dict[str, float]:
    """campaignd_webhook_requests_total for wassenger by outcome, and the
    event writer's group commits ("commits"), from /metrics."""
    prefix = "campaignd_webhook_requests_total{"
    found = {}
    for line in web.http.get(web.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix) and 'provider="wassenger"' in line:
            labels, value = line.rsplit(" ", 1)
            found[labels.split('outcome="')[1].split('"')[0]] = float(value)
        elif line.startswith("campaignd_webhook_commit_seconds_count "):
            found["commits"] = float(line.split()[1])
    return found


def counted_since(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)}


def test_sqlite_locked_database_is_503_then_recovers(make_config, web_factory):
    cfg = make_config("sqlite", {"database": {"busy_timeout_s": 0.3}})
    web = web_factory(cfg)
    before = outcomes(web)
    # Another process's writer holding the lock longer than our busy timeout.
    path = cfg.database_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        resp = web.post("/webhooks/wassenger", inbound("LOCK1"))
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "5"
        assert resp.json()["title"] == "Database unavailable"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert event_count() == 0
    resp = web.post("/webhooks/wassenger", inbound("LOCK1"))
    assert resp.status_code == 200 and resp.json()["stored"] == 1
    resp = web.post("/webhooks/wassenger", inbound("LOCK1"))
    assert resp.status_code == 200 and resp.json()["duplicates"] == 1
    # What an operator reads: one POST of each outcome, and the two that
    # were answered 200 each committed in a group of its own.
    assert counted_since(before, outcomes(web)) == {
        "unavailable": 1.0,
        "stored": 1.0,
        "duplicate": 1.0,
        "commits": 2.0,
    }


def test_postgres_unreachable_is_503_then_recovers(
    make_config, pg_url, redis_prefix, web_factory
):
    cfg = make_config("cluster", pg=pg_url, redis=redis_prefix)
    web = web_factory(cfg)
    assert web.post("/webhooks/wassenger", inbound("PG0")).status_code == 200
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        try:
            for msg_id in ("PG1", "PG2"):
                resp = web.post("/webhooks/wassenger", inbound(msg_id))
                assert resp.status_code == 503, resp.text
                assert resp.headers["Retry-After"] == "5"
            ready = web.http.get(web.url + "/readyz", timeout=30)
            assert ready.status_code == 503
            assert ready.json()["checks"]["failed"] == ["database"]
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    resp = web.post("/webhooks/wassenger", inbound("PG1"))
    assert resp.status_code == 200 and resp.json()["stored"] == 1
    assert event_count() == 2


def test_a_cut_postgres_connection_costs_no_webhook(
    make_config, pg_url, redis_prefix, web_factory
):
    """The writer keeps its connection between group commits; when the server
    cuts it (a restart, a network blip), the next group is stored on a new
    one instead of answering 503."""
    cfg = make_config("cluster", pg=pg_url, redis=redis_prefix)
    web = web_factory(cfg)
    assert web.post("/webhooks/wassenger", inbound("CUT0")).status_code == 200
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        cut = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    assert cut, "no connection to cut"
    for msg_id in ("CUT1", "CUT2"):
        resp = web.post("/webhooks/wassenger", inbound(msg_id))
        assert resp.status_code == 200 and resp.json()["stored"] == 1, resp.text
    assert event_count() == 3


def test_body_limits_over_http(make_config, web_factory):
    cfg = make_config("sqlite", {"web": {"max_body_bytes": 4096}})
    web = web_factory(cfg)
    url = web.url + "/webhooks/wassenger"
    big = json.dumps(inbound("BIG", body="x" * 8000)).encode()
    resp = requests.post(url, data=big, timeout=30)
    assert resp.status_code == 413
    assert resp.json()["title"] == "Body too large"
    # Chunked: waitress de-chunks and sets Content-Length; the same 413.
    resp = requests.post(url, data=iter([big[:5000], big[5000:]]), timeout=30)
    assert resp.status_code == 413
    # Far above the limit, waitress refuses before the app runs.
    resp = requests.post(url, data=b"x" * (4096 + 200_000), timeout=30)
    assert resp.status_code == 413
    assert event_count() == 0


def test_stop_returns_promptly_with_keepalive_clients(make_config):
    cfg = make_config("sqlite")
    web = Web(cfg)
    assert web.post("/webhooks/wassenger", inbound("K1")).status_code == 200
    web.server.stop()
    web.thread.join(10)
    assert not web.thread.is_alive()
    web.queues.close()
