"""Driving campaignd for the side-by-side workloads.

Every run gets a fresh store: a new data dir (embedded: SQLite + SqliteHuey)
or a new PostgreSQL database and Redis name prefix (cluster). The harness
process seeds rows and enqueues through the real modules (peewee models,
`Tasks` as producer); everything measured runs in `campaignd` processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import peewee as pw

from bench.harness import CAMPAIGND
from bench.harness import MAIN_PYTHON
from bench.harness import PROVIDER_TOKEN
from bench.harness import BenchError
from bench.harness import PrivateRedis
from bench.harness import Spawned
from bench.harness import bench_env
from bench.harness import create_database
from bench.harness import drop_database
from bench.harness import free_port
from bench.harness import http_ok
from bench.harness import pg_backends
from bench.harness import spawn
from bench.harness import wait_until
from daemon import config as config_mod
from daemon import config_text
from daemon import status as status_mod
from daemon.app.tasks import Tasks
from daemon.domain import campaigns
from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from daemon.store.queue import make_queues

MESSAGE_1 = "Bonjour {name}, une offre pour vous."
MESSAGE_2 = "Merci {name} !"
_runs = itertools.count(1)


def phone_for(index: int) -> str:
    """A distinct valid mobile number (never ending in 0000: the fake's invalid)."""
    return f"+336{index:07d}1"


def _toml(data: dict) -> str:
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {config_text.toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class CdRun:
    """One campaignd run's config, its store, and a producer in this process."""

    mode: str  # "embedded" | "cluster"
    workdir: Path
    cfg: config_mod.Config
    config_path: Path
    pg_name: str | None
    db: pw.Database | None = None
    tasks: Tasks | None = None

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.web.port}"

    def open(self) -> CdRun:
        self.db = open_database(self.cfg, migrate_schema=True)
        self.tasks = Tasks(self.cfg, make_queues(self.cfg))
        return self

    def close(self) -> None:
        if self.tasks is not None:
            self.tasks.queues.close()
        if self.db is not None:
            close_all = getattr(self.db, "close_all", None)
            if close_all:
                close_all()
            elif not self.db.is_closed():
                self.db.close()
        if self.pg_name:
            drop_database(self.pg_name)

    def service_processes(self, redis: PrivateRedis):
        if self.mode == "embedded":
            return []
        return redis.processes() + pg_backends(self.pg_name)

    # ---------------------------------------------------------- seeding

    def seed_campaign(self, count: int, start: int = 0, name: str = "bench") -> int:
        """`count` new contacts in a new draft campaign; the campaign id."""
        now = utcnow()
        rows = [
            {
                "phone": phone_for(start + i),
                "name": f"Contact {start + i}",
                "variables": {},
                "created_at": now,
            }
            for i in range(count)
        ]
        with database.atomic():
            for chunk in range(0, len(rows), 500):
                Contact.insert_many(rows[chunk : chunk + 500]).execute()
        phones = [r["phone"] for r in rows]
        ids = []
        for chunk in range(0, len(phones), 500):
            query = Contact.select(Contact.id).where(
                Contact.phone.in_(phones[chunk : chunk + 500])
            )
            ids += [c.id for c in query]
        campaign = campaigns.create_campaign(name, MESSAGE_1, MESSAGE_2, ids)
        return campaign.id

    def start_campaign(self, campaign_id: int) -> None:
        """draft -> running and enqueue the fan-out task, as the CLI/API do."""
        campaigns.start_campaign(campaign_id, self.tasks)

    def create_rows_and_enqueue(self, campaign_id: int) -> list[int]:
        """Do the fan-out here (rows and their send tasks, as the fan-out task
        enqueues them), not in a worker."""
        Campaign.update(status=CampaignStatus.RUNNING, started_at=utcnow()).where(
            Campaign.id == campaign_id
        ).execute()
        ids: list[int] = []
        # One batch: the fan-out query's cost grows with the rows already
        # made (see docs/benchmarks.md), and this is set-up, not measured.
        while batch := campaigns.fan_out(campaign_id, 1_000_000):
            ids += batch
        self.tasks.enqueue_message1(ids)
        return ids

    def sent_count(self, campaign_id: int) -> int:
        return (
            Message.select()
            .where(
                Message.campaign == campaign_id,
                Message.status.in_(("sent", "delivered", "read")),
            )
            .count()
        )

    def status_counts(self, campaign_id: int) -> dict[str, int]:
        rows = (
            Message.select(Message.status, pw.fn.COUNT(Message.id))
            .where(Message.campaign == campaign_id)
            .group_by(Message.status)
            .tuples()
        )
        return dict(rows)

    def references(self, campaign_id: int) -> dict[str, str]:
        """idempotency key (the provider reference) -> row status."""
        rows = (
            Message.select(Message.idempotency_key, Message.status)
            .where(Message.campaign == campaign_id)
            .tuples()
        )
        return dict(rows)

    def stored_events(self) -> int:
        return InboundEvent.select().count()

    def event_processed_at(self, event_id: int) -> dt.datetime | None:
        row = InboundEvent.get_or_none(InboundEvent.id == event_id)
        return row.processed_at if row is not None else None

    def last_event_id(self) -> int | None:
        row = InboundEvent.select(pw.fn.MAX(InboundEvent.id)).scalar()
        return row

    # ---------------------------------------------------------- processes

    def start_workers(self, processes: int, queue: str = "messages") -> list[Spawned]:
        cmd = [str(CAMPAIGND), "worker", "--queue", queue, "-c", str(self.config_path)]
        return [spawn(f"worker-{queue}", cmd, self.log_dir) for _ in range(processes)]

    def start_web(self) -> Spawned:
        cmd = [str(CAMPAIGND), "web", "-c", str(self.config_path)]
        # Metrics in shared files, as under the supervisor: each increment
        # is a write under a process-wide lock, part of what a webhook costs.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        metrics_dir = Path(tempfile.mkdtemp(prefix="metrics-", dir=self.log_dir))
        env = bench_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        web = spawn("web", cmd, self.log_dir, env)
        try:
            wait_until(
                lambda: http_ok(self.web_url + "/healthz") or not web.alive(),
                30,
                "campaignd web to answer /healthz",
                interval=0.05,
            )
        finally:
            if not web.alive():
                raise BenchError(f"campaignd web exited:\n{web.log_tail()}")
        return web

    def run_command(self) -> list[str]:
        return [str(CAMPAIGND), "run", "-c", str(self.config_path)]

    def start_daemon(self) -> Spawned:
        return spawn("campaignd-run", self.run_command(), self.log_dir)

    # ---------------------------------------------------------- status socket

    def status(self) -> dict | None:
        """Roles only (answered at once), or None when nobody answers."""
        try:
            return status_mod.request(
                self.cfg.status_socket, {"cmd": "status", "figures": False}, 2.0
            )
        except (OSError, ValueError):
            return None

    def is_ready(self) -> dict | None:
        answer = self.status()
        if answer and answer.get("daemon", {}).get("state") == "running":
            return answer
        return None

    def role(self, answer: dict, name: str) -> dict | None:
        for role in answer.get("roles", []):
            if role["name"] == name:
                return role
        return None


def new_run(
    mode: str,
    base: Path,
    fake_url: str,
    redis: PrivateRedis | None,
    session: str,
    extra: dict | None = None,
) -> CdRun:
    """Write a config for a fresh store of `mode`; nothing is started."""
    n = next(_runs)
    workdir = base / f"cd-{mode}-{n}"
    workdir.mkdir(parents=True)
    data: dict = {
        "daemon": {
            "data_dir": str(workdir / "data"),
            "log_level": "info",
            "stop_timeout_s": 5.0,
        },
        "web": {"port": free_port()},
        "provider": {"base_url": fake_url, "token": PROVIDER_TOKEN},
        # No pacing: the workloads measure the machinery, not the send rate a
        # WhatsApp number may have.
        "pacing": {"per_minute": 0.0, "daily_cap": 0},
    }
    pg_name = None
    if mode == "cluster":
        if redis is None:
            raise BenchError("cluster mode needs Redis")
        pg_name = f"cdbench_{session}_{n}"
        data["database"] = {"url": create_database(pg_name)}
        data["queue"] = {
            "backend": "redis",
            "url": redis.url_db(0),
            "name_prefix": f"cdb{session}{n}",
        }
    for table, values in (extra or {}).items():
        data.setdefault(table, {}).update(values)
    path = workdir / "campaignd.toml"
    path.write_text(_toml(data))
    return CdRun(mode, workdir, config_mod.load(path), path, pg_name)


class RestartLoop:
    """Runs a command again whenever it exits, after `restart_s` (like systemd).

    Stands in for systemd's Restart=always (RestartSec defaults to 100 ms) or
    for a shell `while true` loop.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_dir: Path,
        restart_s: float,
        env: dict | None = None,
    ):
        self.name = name
        self.cmd = cmd
        self.log_dir = log_dir
        self.restart_s = restart_s
        self.env = env
        self.current: Spawned | None = None
        self.starts: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RestartLoop:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            self.current = spawn(self.name, self.cmd, self.log_dir, self.env)
            self.starts.append(time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            current = self.current
            current.proc.wait()
            if self._stop.wait(self.restart_s):
                return
            self._spawn()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            current = self.current
        if current is not None:
            current.stop(timeout=10)
        self._thread.join(timeout=15)


def post_probe_event(run: CdRun, tag: str) -> int:
    """POST one webhook to campaignd web; the id of the stored event."""
    import urllib.request

    from bench.loadgen import webhook_body

    body = webhook_body(tag, 1)
    req = urllib.request.Request(
        run.web_url + "/webhooks/wassenger", data=body, method="POST"
    )
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as resp:
        answer = json.loads(resp.read())
    if answer.get("stored") != 1:
        raise BenchError(f"probe webhook not stored: {answer}")
    event_id = run.last_event_id()
    if event_id is None:
        raise BenchError("probe webhook stored but not found")
    return event_id


def utc_epoch(value: dt.datetime) -> float:
    """A naive-UTC datetime from the database as a Unix time."""
    return value.replace(tzinfo=dt.UTC).timestamp()


def python_cmd(*args: str) -> list[str]:
    return [str(MAIN_PYTHON), *args]


@contextlib.contextmanager
def opened(run: CdRun):
    run.open()
    try:
        yield run
    finally:
        run.close()
