"""Dispatch throughput: Message 1 to N contacts through real workers.

For each storage mode (embedded: SQLite + SqliteHuey; cluster: PostgreSQL +
Redis), each run: a fresh data dir (and PG database / Redis prefix), the fake
provider in its own process (`campaignd fake-provider`, 0 ms latency), N
contacts, and P `campaignd worker --queue messages` processes of T threads
(the default layout is workers.messages_processes = 2 x messages_threads = 2).

--fanout before (default): the campaign is started, its Message 1 rows and
queue entries are made before the workers start: the figures are the send
path alone. --fanout worker: the workers start first and the fan-out runs as
the normal task on the messages queue (in --fanout-batch batches).

Columns: msgs/s from the provider's first accepted send to its last; wall
seconds from the workers' start to every row marked sent; CPU seconds of the
worker processes (psutil, user + system, from the moment each is up) and per
message; the peak RSS (VmHWM) of the largest worker. Every run checks that
the provider took each reference exactly once. Medians over --runs.

Usage: python bench/dispatch.py [--messages 5000] [--runs 3]
       [--processes 2] [--threads 2] [--modes embedded,cluster]
       [--fanout before|worker] [--fanout-batch 500]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import config as config_mod  # noqa: E402
from daemon import config_text  # noqa: E402
from daemon.app.tasks import Tasks  # noqa: E402
from daemon.domain import campaigns  # noqa: E402
from daemon.runtime import HEARTBEAT_ENV  # noqa: E402
from daemon.store.db import open_database  # noqa: E402
from daemon.store.models import Contact  # noqa: E402
from daemon.store.models import Message  # noqa: E402
from daemon.store.models import database  # noqa: E402
from daemon.store.models import utcnow  # noqa: E402
from daemon.store.queue import make_queues  # noqa: E402

PG_URL = os.environ.get(
    "CAMPAIGND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CAMPAIGND_TEST_REDIS", "redis://127.0.0.1:6379/0")
SENT = ("sent", "delivered", "read")


@dataclass(frozen=True)
class RunResult:
    msgs_per_s: float
    wall_s: float
    cpu_s: float
    cpu_ms_per_msg: float
    peak_rss_mb: float


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    for name in ("CAMPAIGND_CONFIG", "CAMPAIGND_SUPERVISOR_PID"):
        env.pop(name, None)
    env.pop("CAMPAIGND_HEARTBEAT_FILE", None)
    return env


def fake_get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def fake_provider(log_dir: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_dir / "fake.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "fake-provider", "--port", str(port)]
            + ["--latency-ms", "0", "--ack-delays-ms", ""],
            cwd=ROOT,
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _answers(url), 15, "the fake provider")
        yield url
    finally:
        stop(proc)


def _answers(url: str) -> bool:
    try:
        fake_get(url, "/_fake/stats")
    except OSError:
        return False
    return True


def start_workers(cfg_path: Path, count: int, log_dir: Path) -> tuple[list, float]:
    """Start the workers; return them and their CPU seconds when each was up.

    A worker is up once its consumer loop has beaten its heartbeat file; its
    CPU time then (imports, connections) is left out of the figures.
    """
    procs = []
    for index in range(count):
        log_path = log_dir / f"worker-{index}.log"
        beat = log_dir / f"worker-{index}.heartbeat"
        env = child_env() | {HEARTBEAT_ENV: str(beat)}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "worker", "--queue", "messages"]
                + ["-c", str(cfg_path)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append((proc, log_path, beat))
    baseline: dict[int, float] = {}

    def ready() -> bool:
        for proc, log_path, beat in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log_path.read_text()[-2000:]}")
            if proc.pid not in baseline and beat.exists() and beat.stat().st_size:
                baseline[proc.pid] = cpu_seconds([proc])
        return len(baseline) == len(procs)

    wait_until(ready, 60, "the workers to start", interval=0.01)
    return [proc for proc, _, _ in procs], sum(baseline.values())


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(10)


def cpu_seconds(procs) -> float:
    total = 0.0
    for proc in procs:
        times = psutil.Process(proc.pid).cpu_times()
        total += times.user + times.system
    return total


def peak_rss_mb(pid: int) -> float:
    """The process's high-water RSS (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return psutil.Process(pid).memory_info().rss / 2**20


# ---------------------------------------------------------------- storage


@contextlib.contextmanager
def storage(mode: str, data_dir: Path):
    """Config tables for the mode; PG database and Redis keys removed after."""
    if mode == "embedded":
        yield {}
        return
    import psycopg
    import redis

    name = f"cdbench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    admin.execute(f'CREATE DATABASE "{name}"')
    parts = PG_URL.rsplit("/", 1)[0]
    try:
        yield {
            "database": {"url": f"{parts}/{name}"},
            "queue": {"backend": "redis", "url": REDIS_URL, "name_prefix": name},
        }
    finally:
        with contextlib.suppress(Exception):
            database.close()
            close_all = getattr(database.obj, "close_all", None)
            if close_all:
                close_all()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{name}*", count=1000))
        if keys:
            client.delete(*keys)


def cluster_available() -> str | None:
    try:
        import psycopg
        import redis

        psycopg.connect(PG_URL, connect_timeout=3).close()
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def seed(count: int) -> list[int]:
    now = utcnow()
    rows = [
        {"phone": f"+336{i:07d}1", "name": f"C{i}", "variables": {}, "created_at": now}
        for i in range(count)
    ]
    with database.atomic():
        for start in range(0, count, 500):
            Contact.insert_many(rows[start : start + 500]).execute()
    return [c.id for c in Contact.select(Contact.id)]


def sent_rows(campaign_id: int) -> int:
    return (
        Message.select()
        .where(Message.campaign == campaign_id, Message.status.in_(SENT))
        .count()
    )


# ---------------------------------------------------------------- one run


def one_run(mode: str, args, work: Path) -> RunResult:
    data_dir = work / "data"
    with fake_provider(work) as url, storage(mode, data_dir) as tables:
        data = {
            "daemon": {"data_dir": str(data_dir), "log_level": "warning"},
            "provider": {"base_url": url},
            "pacing": {"per_minute": 0.0, "daily_cap": 0},
            "workers": {
                "messages_processes": args.processes,
                "messages_threads": args.threads,
            },
            "campaigns": {"fanout_batch": args.fanout_batch},
            **tables,
        }
        cfg_path = work / "campaignd.toml"
        cfg_path.write_text(config_text.to_toml(data))
        cfg = config_mod.load(cfg_path)
        open_database(cfg, migrate_schema=True)
        queues = make_queues(cfg)
        tasks = Tasks(cfg, queues)
        campaign = campaigns.create_campaign(
            "bench", "Bonjour {name}", "Merci", seed(args.messages)
        )
        campaigns.start_campaign(campaign.id, tasks)
        if args.fanout == "before":
            # Dispatch alone: rows and queue entries exist before any worker.
            queues.messages.flush()
            tasks.enqueue_message1(campaigns.fan_out(campaign.id, args.messages))
        started = time.monotonic()
        workers, cpu_before = start_workers(cfg_path, args.processes, work)
        try:
            wait_until(
                lambda: (
                    fake_get(url, "/_fake/stats")["sends_accepted"] >= args.messages
                ),
                110,
                "every send to reach the provider",
                interval=0.2,
            )
            wait_until(
                lambda: sent_rows(campaign.id) == args.messages,
                30,
                "every row to be marked sent",
                interval=0.1,
            )
            wall = time.monotonic() - started
            cpu = cpu_seconds(workers) - cpu_before
            rss = max(peak_rss_mb(w.pid) for w in workers)
        finally:
            for worker in workers:
                stop(worker)
            queues.close()
        check_once(url, args.messages)
        first, last = send_span(fake_get(url, "/_fake/messages"))
    return RunResult(
        msgs_per_s=(args.messages - 1) / max(last - first, 1e-3),
        wall_s=wall,
        cpu_s=cpu,
        cpu_ms_per_msg=cpu * 1000.0 / args.messages,
        peak_rss_mb=rss,
    )


def check_once(url: str, count: int) -> None:
    stats = fake_get(url, "/_fake/stats")
    if stats["sends_accepted"] != count or stats["per_reference_max"] != 1:
        raise RuntimeError(f"provider did not get each message once: {stats}")


def send_span(messages: list[dict]) -> tuple[float, float]:
    """Epoch seconds of the first and last accepted send (ms resolution)."""
    stamps = [
        dt.datetime.fromisoformat(m["createdAt"].replace("Z", "+00:00")).timestamp()
        for m in messages
    ]
    return min(stamps), max(stamps)


# ---------------------------------------------------------------- main


def run_mode(mode: str, args) -> list[RunResult]:
    results = []
    for index in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix=f"cd-dispatch-{mode}-"))
        try:
            result = one_run(mode, args, work)
        except Exception:
            print(f"  run {index + 1} failed; logs kept in {work}", file=sys.stderr)
            raise
        shutil.rmtree(work, ignore_errors=True)
        print(
            f"  {mode} run {index + 1}: {result.msgs_per_s:,.0f} msgs/s, "
            f"{result.cpu_ms_per_msg:.2f} ms CPU/msg",
            file=sys.stderr,
        )
        results.append(result)
    return results


def median(results: list[RunResult], name: str) -> float:
    return statistics.median(getattr(r, name) for r in results)


def print_table(rows: list[tuple[str, list[RunResult]]], args) -> None:
    layout = f"{args.processes} proc x {args.threads} threads"
    fanout = (
        "fan-out before the workers start"
        if args.fanout == "before"
        else f"fan-out in a worker (batches of {args.fanout_batch})"
    )
    print(
        f"\nDispatch of {args.messages:,} Message 1 sends, {layout}, {fanout}, "
        f"fake provider 0 ms, median of {args.runs} run(s), "
        f"{os.cpu_count()} CPUs\n"
    )
    header = (
        f"{'mode':<10} {'msgs/s':>9} {'wall s':>8} {'worker CPU s':>13} "
        f"{'CPU ms/msg':>11} {'peak RSS MiB':>13}"
    )
    print(header)
    print("-" * len(header))
    for mode, results in rows:
        print(
            f"{mode:<10} {median(results, 'msgs_per_s'):>9,.0f} "
            f"{median(results, 'wall_s'):>8.2f} {median(results, 'cpu_s'):>13.2f} "
            f"{median(results, 'cpu_ms_per_msg'):>11.2f} "
            f"{median(results, 'peak_rss_mb'):>13.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="embedded,cluster")
    parser.add_argument(
        "--fanout",
        choices=("before", "worker"),
        default="before",
        help="before: rows and queue filled before the workers start (dispatch "
        "alone); worker: the campaign starts normally, fan-out task included",
    )
    parser.add_argument(
        "--fanout-batch", type=int, default=500, help="campaigns.fanout_batch"
    )
    args = parser.parse_args()
    rows = []
    for mode in args.modes.split(","):
        if mode not in ("embedded", "cluster"):
            parser.error(f"unknown mode {mode!r} (embedded, cluster)")
        if mode == "cluster" and (why := cluster_available()):
            print(f"cluster mode skipped: {why}", file=sys.stderr)
            continue
        rows.append((mode, run_mode(mode, args)))
    print_table(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
