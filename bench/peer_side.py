"""Driving the peer replica (bench/peers, in bench/.venv-peer).

Every run gets a fresh PostgreSQL database with the peer's schema and an
emptied Redis database (broker and result backend). Processes are the ones
start.sh ran: ``celery worker`` (prefork, 4 children), ``celery beat`` and
``uvicorn`` (one process). The harness seeds rows with psycopg and enqueues
Celery tasks through `PeerControl` (bench/peers/ctl.py in the peer's venv).
"""

from __future__ import annotations

import itertools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.harness import PEER_PYTHON
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
from bench.peers.models import create_schema

MESSAGE_1 = "Bonjour {name}, une offre pour vous."
PEER_REDIS_DB = 1
QUEUES = "default,messages,messages_high,retry,verification"
_runs = itertools.count(1)


def phone_for(index: int) -> str:
    return f"+336{index:07d}1"


def celery_worker_cmd() -> list[str]:
    # As start.sh, with the concurrency celery_app.py configures (4); the
    # deployed start.sh passed --concurrency=1 (audit section 4).
    return [
        str(PEER_PYTHON),
        "-m",
        "celery",
        "-A",
        "bench.peers.celery_app:celery_app",
        "worker",
        "--loglevel=warning",
        "--concurrency=4",
        "-Q",
        QUEUES,
    ]


@dataclass
class PeerRun:
    workdir: Path
    pg_name: str
    database_url: str
    redis: PrivateRedis
    provider_url: str
    web_port: int

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def env(self) -> dict:
        return bench_env(
            PEER_DATABASE_URL=self.database_url,
            PEER_REDIS_URL=self.redis.url_db(PEER_REDIS_DB),
            PEER_PROVIDER_URL=self.provider_url,
            PEER_PROVIDER_TOKEN=PROVIDER_TOKEN,
        )

    def close(self) -> None:
        drop_database(self.pg_name)

    def service_processes(self):
        return self.redis.processes() + pg_backends(self.pg_name)

    # ---------------------------------------------------------- seeding

    def seed_campaign(self, count: int, start: int = 0) -> int:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            campaign_id = conn.execute(
                "INSERT INTO campaigns (name, message_1, message_2) "
                "VALUES ('bench', %s, 'Merci {name} !') RETURNING id",
                (MESSAGE_1,),
            ).fetchone()[0]
            with (
                conn.cursor() as cur,
                cur.copy("COPY contacts (phone, name) FROM STDIN") as copy,
            ):
                for i in range(start, start + count):
                    copy.write_row((phone_for(i), f"Contact {i}"))
            conn.execute(
                "INSERT INTO campaign_contacts (campaign_id, contact_id) "
                "SELECT %s, id FROM contacts WHERE id > coalesce(("
                "  SELECT max(contact_id) FROM campaign_contacts), 0)",
                (campaign_id,),
            )
        return campaign_id

    def create_rows(self, campaign_id: int) -> list[int]:
        """The fan-out's rows, made here (for W4: sends enqueued by the harness)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "INSERT INTO messages (campaign_id, contact_id, content) "
                "SELECT cc.campaign_id, c.id, replace(%s, '{name}', c.name) "
                "FROM campaign_contacts cc JOIN contacts c ON c.id = cc.contact_id "
                "WHERE cc.campaign_id = %s ORDER BY c.id RETURNING id",
                (MESSAGE_1, campaign_id),
            ).fetchall()
        return [r[0] for r in rows]

    def _scalar(self, sql: str, args: tuple = ()):
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(sql, args).fetchone()[0]

    def sent_count(self, campaign_id: int) -> int:
        return self._scalar(
            "SELECT count(*) FROM messages WHERE campaign_id = %s AND status = 'sent'",
            (campaign_id,),
        )

    def status_counts(self, campaign_id: int) -> dict[str, int]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM messages WHERE campaign_id = %s "
                "GROUP BY status",
                (campaign_id,),
            ).fetchall()
        return dict(rows)

    def references(self, campaign_id: int) -> dict[str, str]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, status FROM messages WHERE campaign_id = %s",
                (campaign_id,),
            ).fetchall()
        return {f"peer-{i}": status for i, status in rows}

    def webhook_logs(self) -> int:
        return self._scalar("SELECT count(*) FROM webhook_logs")

    # ---------------------------------------------------------- processes

    def start_worker(self) -> Spawned:
        return spawn("celery-worker", celery_worker_cmd(), self.log_dir, self.env)

    def start_beat(self) -> Spawned:
        schedule = self.workdir / "celerybeat-schedule"
        cmd = [
            str(PEER_PYTHON),
            "-m",
            "celery",
            "-A",
            "bench.peers.celery_app:celery_app",
            "beat",
            "--loglevel=warning",
            "--schedule",
            str(schedule),
        ]
        return spawn("celery-beat", cmd, self.log_dir, self.env)

    def start_web(self, wait: bool = True) -> Spawned:
        cmd = [
            str(PEER_PYTHON),
            "-m",
            "uvicorn",
            "bench.peers.web:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.web_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        web = spawn("uvicorn", cmd, self.log_dir, self.env)
        if wait:
            wait_until(
                lambda: http_ok(self.web_url + "/health") or not web.alive(),
                30,
                "uvicorn to answer /health",
                interval=0.05,
            )
            if not web.alive():
                raise BenchError(f"uvicorn exited:\n{web.log_tail()}")
        return web

    def control(self) -> PeerControl:
        return PeerControl(self)


class PeerControl:
    """bench/peers/ctl.py: enqueue Celery tasks from the harness."""

    def __init__(self, run: PeerRun):
        self.spawned = spawn(
            "peer-ctl",
            [str(PEER_PYTHON), "-m", "bench.peers.ctl"],
            run.log_dir,
            run.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.call({"cmd": "ping"}, timeout=60)

    def call(self, command: dict, timeout: float = 60.0) -> dict:
        proc = self.spawned.proc
        proc.stdin.write((json.dumps(command) + "\n").encode())
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"peer ctl died:\n{self.spawned.log_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchError(f"peer ctl: {answer['error']}")
        return answer

    def fanout(self, campaign_id: int) -> None:
        self.call({"cmd": "fanout", "campaign_id": campaign_id})

    def send(self, ids: list[int]) -> None:
        for start in range(0, len(ids), 1000):
            self.call({"cmd": "send", "ids": ids[start : start + 1000]})

    def probe(self, key: str, old: list[int], timeout: float, every_ms: float = 50.0):
        return self.call(
            {
                "cmd": "probe",
                "key": key,
                "old": old,
                "timeout": timeout,
                "every_ms": every_ms,
            },
            timeout=timeout + 30,
        )

    def close(self) -> None:
        proc = self.spawned.proc
        if proc.stdin:
            proc.stdin.close()
        self.spawned.stop(timeout=5)


def new_run(
    base: Path, redis: PrivateRedis, provider_url: str, session: str
) -> PeerRun:
    n = next(_runs)
    workdir = base / f"peer-{n}"
    (workdir / "logs").mkdir(parents=True)
    pg_name = f"cdbench_peer_{session}_{n}"
    url = create_database(pg_name)
    create_schema(url)
    redis.client(PEER_REDIS_DB).flushdb()
    return PeerRun(workdir, pg_name, url, redis, provider_url, free_port())


def pool_children(worker: Spawned) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(worker.pid).children()]
    except psutil.Error:
        return []


def wait_pool(worker: Spawned, size: int = 4, timeout: float = 30.0) -> list[int]:
    return wait_until(
        lambda: len(pool_children(worker)) >= size and pool_children(worker),
        timeout,
        "the Celery pool",
    )
