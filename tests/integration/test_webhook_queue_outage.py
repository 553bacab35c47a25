"""A webhook's answer never waits on the queue (issue 12, part 3).

Cluster-like: PostgreSQL and a Redis queue (queue.backend = "redis") served by
a redis-server of this test's own, which is then hung (SIGSTOP: connections
are accepted, nothing is answered) or refused (nothing listens on the port).
Meanwhile a large Meta POST and other webhooks are answered 200 and stored at
the speed of their commit, and once Redis is back the events are processed:
new ones through the queue, the ones the queue missed through the sweeper.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from daemon.app.tasks import Tasks
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.conftest import _missing
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

ENQUEUE_TIMEOUT_S = 2.0  # web.enqueue_timeout_s, the default
OTHERS = 12  # webhooks posted while the queue is down
META_ITEMS = 200  # statuses in the large Meta POST (25 processing tasks)


def inbound(msg_id: str) -> dict:
    return {
        "id": msg_id,
        "object": "message",
        "event": "message:in:new",
        "data": {
            "id": msg_id,
            "flow": "inbound",
            "fromNumber": "+33612345678",
            "body": "oui",
            "timestamp": 1765642500,
        },
    }


def meta_statuses(prefix: str, count: int) -> dict:
    statuses = [
        {
            "id": f"wamid.{prefix}{i}",
            "status": "delivered",
            "timestamp": "1750857384",
            "recipient_id": "5516992318222",
        }
        for i in range(count)
    ]
    change = {"field": "messages", "value": {"statuses": statuses}}
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1314702302917944", "changes": [change]}],
    }


class RedisServer:
    """A private redis-server on `port`, no persistence."""

    def __init__(self, port: int, workdir):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.stopped = False
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_for(lambda: self._pings(client), timeout=15, what="redis-server up")
        client.close()

    @staticmethod
    def _pings(client) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def hang(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_servers(tmp_path):
    if shutil.which("redis-server") is None:
        _missing("redis-server", "the binary is not installed")
    started: list[RedisServer] = []

    def start(port: int) -> RedisServer:
        server = RedisServer(port, tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Web:
    """The web app on waitress (loopback), with its own Tasks and queues."""

    def __init__(self, cfg):
        open_database(cfg, migrate_schema=True)
        database.close()
        self.queues = make_queues(cfg)
        self.tasks = Tasks(cfg, self.queues)
        self.server = WebServer(create_app(cfg, self.tasks), cfg, port=0)
        self.thread = self.server.serve_in_thread()
        self.url = self.server.url

    def post(self, path: str, payload) -> tuple[requests.Response, float]:
        started = time.monotonic()
        reply = requests.post(self.url + path, json=payload, timeout=60)
        return reply, time.monotonic() - started

    def close(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self.queues.close()
        database.close()


@pytest.fixture
def web_on(make_config, pg_url):
    """web_on(redis_port) -> Web, PostgreSQL + Redis queue on that port."""
    started: list[Web] = []

    def start(port: int) -> Web:
        cfg = make_config(
            "sqlite",
            {
                "database": {"url": pg_url},
                "queue": {
                    "backend": "redis",
                    "url": f"redis://127.0.0.1:{port}/0",
                    "name_prefix": "cdt_outage",
                },
                "web": {"enqueue_timeout_s": ENQUEUE_TIMEOUT_S},
            },
        )
        web = Web(cfg)
        started.append(web)
        return web

    yield start
    for web in started:
        web.close()


def stored_count() -> int:
    with database.connection_context():
        return InboundEvent.select().count()


def unprocessed() -> int:
    with database.connection_context():
        return InboundEvent.select().where(InboundEvent.processed_at.is_null()).count()


def queued_event_ids(web: Web) -> set[int]:
    return {i for task in web.queues.default.pending() for i in task.args[0]}


def post_during_outage(web: Web, tag: str) -> None:
    """A large Meta POST and OTHERS webhooks at once: all answered promptly."""
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(
            web.post, "/webhooks/whatsapp", meta_statuses(tag, META_ITEMS)
        )
        answers = [
            web.post("/webhooks/wassenger", inbound(f"{tag}{i}")) for i in range(OTHERS)
        ]
        big_reply, big_s = big.result(timeout=60)
    assert big_reply.status_code == 200
    assert big_reply.json() == {"stored": META_ITEMS, "duplicates": 0}
    assert [r.status_code for r, _ in answers] == [200] * OTHERS
    assert all(r.json()["stored"] == 1 for r, _ in answers)
    # Stored by the time they are answered ("2xx means stored").
    assert stored_count() >= META_ITEMS + OTHERS
    # Not one webhook waited for the queue: an answer that did would take at
    # least the enqueue timeout (2 s; the Redis connect and socket timeouts
    # are 2 s and 5 s), against a commit's tens of milliseconds. How fast
    # they are is bench/webhook_ingest.py's to measure.
    slowest = max(s for _, s in answers)
    assert slowest < ENQUEUE_TIMEOUT_S, f"slowest webhook {slowest:.2f} s"
    assert big_s < ENQUEUE_TIMEOUT_S, f"Meta POST {big_s:.2f} s"


def recover_and_process(web: Web, tag: str) -> None:
    """Redis is back: a new webhook goes through the queue again; the events
    the queue missed are replayed by the sweeper; all end up processed."""
    reply, _ = web.post("/webhooks/wassenger", inbound(f"{tag}-after"))
    assert reply.status_code == 200
    with database.connection_context():
        after = InboundEvent.get(InboundEvent.dedupe_key.contains(f"{tag}-after")).id
    wait_for(
        lambda: after in queued_event_ids(web),
        timeout=20,
        what="the enqueuer to enqueue again once Redis is back",
    )
    with database.connection_context():
        web.tasks.sweep_once(grace_s=0)
    drain_default(web)
    assert unprocessed() == 0


def drain_default(web: Web, limit: int = 2000) -> None:
    """What worker:default does: execute every queued task."""
    huey = web.queues.default
    for _ in range(limit):
        # Checked first: a dequeue from an empty Redis queue blocks 1 s.
        task = huey.dequeue() if huey.pending_count() else None
        if task is None:
            return
        huey.execute(task)
    raise AssertionError("the default queue did not drain")


def test_hung_redis_does_not_delay_webhooks(redis_servers, web_on):
    server = redis_servers(free_port())
    web = web_on(server.port)
    # A connection is in the pool already: the hang hits it and new ones.
    reply, _ = web.post("/webhooks/wassenger", inbound("warm"))
    assert reply.status_code == 200
    wait_for(lambda: queued_event_ids(web), what="the first enqueue")
    server.hang()
    try:
        post_during_outage(web, "hung")
        assert unprocessed() == 1 + META_ITEMS + OTHERS
    finally:
        server.resume()
    recover_and_process(web, "hung")


def test_refused_redis_does_not_delay_webhooks(redis_servers, web_on):
    port = free_port()  # nothing listens there: connections are refused
    web = web_on(port)
    post_during_outage(web, "refused")
    assert unprocessed() == META_ITEMS + OTHERS
    redis_servers(port)
    recover_and_process(web, "refused")
