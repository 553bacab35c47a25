"""Helpers for the send-pipeline tests and the dispatch benchmark.

Real parts only: workers are `python -m daemon worker` subprocesses reading a
config file, contacts are rows in the configured database, and the fake
provider is asked what it received over HTTP or in-process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import peewee as pw
import psutil
import pytest

from daemon.app.tasks import Tasks
from daemon.config import Config
from daemon.domain import campaigns
from daemon.providers import make_provider
from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from daemon.store.queue import Queues
from daemon.store.queue import make_queues
from tests.helpers import merge
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
SENT_OR_LATER = ("sent", "delivered", "read")
# Numbers ending in this suffix are "not on WhatsApp" for the fake provider.
INVALID_SUFFIX = "0000"


def phone_for(index: int) -> str:
    """A distinct valid French mobile number that never ends in 0000."""
    return f"+336{index:07d}1"


def invalid_phone_for(index: int) -> str:
    """A number the fake provider rejects (400: not on WhatsApp)."""
    return f"+337{index:04d}{INVALID_SUFFIX}"


def seed_contacts(count: int, *, start: int = 0, **fields) -> list[int]:
    """Insert `count` contacts (name and a {city} variable); their ids in order."""
    rows = [
        {
            "phone": phone_for(start + i),
            "name": f"Contact {start + i}",
            "variables": {"city": "Lyon"},
            "created_at": utcnow(),
            **fields,
        }
        for i in range(count)
    ]
    with database.atomic():
        for chunk in range(0, len(rows), 500):
            Contact.insert_many(rows[chunk : chunk + 500]).execute()
    phones = [r["phone"] for r in rows]
    by_phone = {}
    for chunk in range(0, len(phones), 500):
        query = Contact.select(Contact.id, Contact.phone).where(
            Contact.phone.in_(phones[chunk : chunk + 500])
        )
        by_phone.update({c.phone: c.id for c in query})
    return [by_phone[p] for p in phones]


def new_campaign(contact_ids, *, name: str = "test", skip_invalid: bool = True):
    return campaigns.create_campaign(
        name,
        "Bonjour {name} de {city}",
        "Merci {name} !",
        contact_ids,
        skip_invalid=skip_invalid,
    )


def running_campaign(count: int, start: int = 0) -> tuple[int, list[int]]:
    """`count` new contacts in a running campaign, fanned out (each member
    has its queued Message 1): (campaign id, contact ids)."""
    ids = seed_contacts(count, start=start)
    campaign = new_campaign(ids)
    Campaign.update(status=CampaignStatus.RUNNING).where(
        Campaign.id == campaign.id
    ).execute()
    while campaigns.fan_out(campaign.id, 1_000_000):
        pass
    return campaign.id, ids


def open_db(cfg: Config) -> pw.Database:
    return open_database(cfg, migrate_schema=True)


def close_db(db: pw.Database) -> None:
    close_all = getattr(db, "close_all", None)
    if close_all is not None:
        close_all()
    elif not db.is_closed():
        db.close()


def mode_config(request, make_config, mode: str, extra: dict | None = None) -> Config:
    """A Config for a storage mode; PG/Redis fixtures skip the test without them.

    sqlite: embedded (SQLite + SqliteHuey); cluster: PostgreSQL + Redis;
    pgqueue: PostgreSQL + PostgresHuey; postgres: a PostgreSQL database with
    the SQLite queue (tests of the database alone).
    """
    if mode == "sqlite":
        return make_config("sqlite", extra)
    pg = request.getfixturevalue("pg_url")
    if mode == "postgres":
        return make_config("sqlite", {**(extra or {}), "database": {"url": pg}})
    if mode == "pgqueue":
        return make_config("pgqueue", extra, pg=pg)
    prefix = request.getfixturevalue("redis_prefix")
    return make_config("cluster", extra, pg=pg, redis=prefix)


class ManualClock:
    """An injected clock (naive UTC) that only moves when told to."""

    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now

    def set(self, when: dt.datetime) -> dt.datetime:
        self.now = when
        return when


@dataclass
class Pipeline:
    """The send path in this process: DB, queues, provider client and Tasks."""

    cfg: Config
    db: pw.Database
    queues: Queues
    tasks: Tasks
    provider: object
    sleeps: list[float]
    clock: object = utcnow

    def close(self) -> None:
        self.provider.close()
        self.queues.close()
        close_db(self.db)


def build_pipeline(cfg: Config, clock=utcnow) -> Pipeline:
    """Tasks wired to the real DB, queues and provider; sleeps are recorded."""
    db = open_db(cfg)
    queues = make_queues(cfg)
    provider = make_provider(cfg.provider)
    sleeps: list[float] = []
    tasks = Tasks(cfg, queues, provider, clock=clock, sleep=sleeps.append)
    return Pipeline(cfg, db, queues, tasks, provider, sleeps, clock)


def manual_pipeline(start: dt.datetime, extra: dict | None = None):
    """A `pipeline` fixture, once on SQLite and once on PostgreSQL + Redis:
    the send path against the `fake` provider, its clock a ManualClock at
    `start` (`pipeline.clock`). `extra`: more config."""

    @pytest.fixture(params=["sqlite", "cluster"])
    def pipeline(request, make_config, fake):
        config = merge(extra or {}, {"provider": {"base_url": fake.url}})
        cfg = mode_config(request, make_config, request.param, config)
        built = build_pipeline(cfg, ManualClock(start))
        yield built
        built.close()

    return pipeline


# ---------------------------------------------------------------- progress


def phone_shows(fake, phone: str) -> dict[str, int]:
    """What a contact's phone received from the fake provider, per kind."""
    counts = fake.phone_counts().get(phone, {})
    return {"m1": counts.get("m1", 0), "m2": counts.get("m2", 0)}


def message_counts(campaign_id: int, kind: int = 1) -> dict[str, int]:
    rows = (
        Message.select(Message.status, pw.fn.COUNT(Message.id))
        .where(Message.campaign == campaign_id, Message.kind == kind)
        .group_by(Message.status)
        .tuples()
    )
    return dict(rows)


def member_counts(campaign_id: int) -> dict[str, int]:
    rows = (
        CampaignContact.select(CampaignContact.state, pw.fn.COUNT(CampaignContact.id))
        .where(CampaignContact.campaign == campaign_id)
        .group_by(CampaignContact.state)
        .tuples()
    )
    return dict(rows)


def sent_count(campaign_id: int) -> int:
    counts = message_counts(campaign_id)
    return sum(counts.get(s, 0) for s in SENT_OR_LATER)


def unfinished(campaign_id: int) -> list[dict]:
    """Rows not sent yet, with what explains why (for failure messages)."""
    query = Message.select().where(
        Message.campaign == campaign_id, Message.status.in_(("queued", "sending"))
    )
    return [
        campaigns.message_dict(m)
        | {"lease_owner": m.lease_owner, "enqueued_at": m.enqueued_at}
        for m in query.limit(5)
    ]


def wait_all_sent(campaign_id: int, members: int, timeout: float) -> None:
    """Wait until every member has Message 1 sent, with a readable failure."""

    def all_sent() -> bool:
        done = member_counts(campaign_id).get(MemberState.MESSAGE_1_SENT, 0)
        return done == members and sent_count(campaign_id) == members

    try:
        wait_for(all_sent, timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(
            f"campaign {campaign_id} not sent after {timeout}s: "
            f"members {member_counts(campaign_id)}, "
            f"messages {message_counts(campaign_id)}, "
            f"unfinished {unfinished(campaign_id)}"
        ) from None


def wait_pg_sessions_gone(client_ports: set[int], timeout: float = 15.0) -> None:
    """Wait until PostgreSQL has ended the sessions of these client ports.

    A statement a killed client had sent may still commit on the server for
    a moment after the client is gone.
    """
    if not client_ports:
        return
    sql = "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(%s)"
    wait_for(
        lambda: not database.execute_sql(sql, (sorted(client_ports),)).fetchone()[0],
        timeout,
        what=f"PG sessions {client_ports} to close",
    )


# ---------------------------------------------------------------- the fake


def fake_get(base_url: str, path: str):
    """GET a /_fake/ control route of a fake provider (any process)."""
    with urllib.request.urlopen(base_url + path, timeout=10) as resp:
        return json.loads(resp.read())


def assert_each_reference_once(stats: dict, messages: list[dict], count: int):
    """The provider accepted `count` distinct references, each exactly once."""
    assert stats["sends_accepted"] == count, stats
    assert stats["per_reference_max"] == 1, stats
    references = [m["reference"] for m in messages]
    assert len(references) == len(set(references)) == count
    assert all(m["accepted_count"] == 1 for m in messages)


# ---------------------------------------------------------------- workers


@dataclass
class Worker:
    """A `campaignd worker` subprocess; its stderr goes to `log_path`."""

    queue: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def lease_owner(self) -> str:
        """The start of every lease owner string of this worker: "host:pid:"
        (daemon.owners.lease_owner() adds a random part); match with
        startswith, as `owns` does."""
        return campaigns.process_key(socket.gethostname(), self.proc.pid)

    def owns(self, owner: str | None) -> bool:
        """Whether a message's lease_owner is this worker's."""
        return bool(owner) and owner.startswith(self.lease_owner)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def tcp_ports_to(self, port: int) -> set[int]:
        """Local ports of this worker's connections to a server `port` (e.g. PG)."""
        conns = psutil.Process(self.pid).net_connections(kind="tcp")
        return {c.laddr.port for c in conns if c.raddr and c.raddr.port == port}

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or an operator would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful: in-flight tasks finish), SIGKILL past `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


def start_worker(cfg: Config, queue: str, log_dir: Path, tag: str = "") -> Worker:
    """Start `python -m daemon worker --queue QUEUE -c <cfg.source>`."""
    assert cfg.source, "the config must come from a file the worker can read"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{queue}{tag}-{time.monotonic_ns()}.log"
    env = dict(os.environ)
    # A stray supervisor variable would make the worker exit at once.
    for name in ("CAMPAIGND_CONFIG", "CAMPAIGND_SUPERVISOR_PID"):
        env.pop(name, None)
    env.pop("CAMPAIGND_HEARTBEAT_FILE", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "worker", "--queue", queue]
            + ["-c", cfg.source],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Worker(queue, proc, log_path)


@contextlib.contextmanager
def running_workers(
    cfg: Config, queues: list[str], log_dir: Path
) -> Iterator[list[Worker]]:
    """Workers for `queues` (one process each), stopped however the block ends.

    The list is live: workers appended inside the block are stopped too.
    """
    workers = [start_worker(cfg, q, log_dir) for q in queues]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def wait_with_logs(predicate, workers: list[Worker], timeout: float, what: str):
    """wait_for, with the workers' logs in the failure message."""
    try:
        return wait_for(predicate, timeout, interval=0.1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + worker_logs(workers)) from None


def worker_logs(workers: list[Worker]) -> str:
    return "\n".join(f"--- {w.queue} pid {w.pid}\n{w.log()}" for w in workers)


def run_queue(huey) -> None:
    """Run every task waiting in `huey`, as a consumer would."""
    while (task := huey.dequeue()) is not None:
        huey.execute(task)


def drop_queue(huey) -> None:
    """Drop every task waiting in `huey`, as a killed consumer would."""
    while huey.dequeue() is not None:
        pass


def before_each_request(tasks: Tasks, action) -> None:
    """Run `action` right before each request's first byte leaves (the
    provider client's on_write: InFlight.begin). `del tasks.inflight.begin`
    ends it."""
    inflight = tasks.inflight
    begin = inflight.begin

    def act_then_begin(message_id):
        action()
        begin(message_id)

    inflight.begin = act_then_begin


def lock_sqlite_for(cfg: Config, seconds: float = 1.0):
    """Another writer that holds SQLite's write lock for `seconds` once called:
    past the busy timeout, every write of the send path fails meanwhile."""
    locker = sqlite3.connect(
        cfg.database_url.removeprefix("sqlite:///"),
        isolation_level=None,
        check_same_thread=False,
    )

    def lock():
        locker.execute("BEGIN IMMEDIATE")
        threading.Timer(seconds, locker.rollback).start()

    return locker, lock
