"""Webhook ingest: req/s and latency of the real web role next to a hello-world ceiling.

Both servers run in their own process with the same waitress settings
(daemon.roles.web.app.WebServer). The real one is `campaignd web`: every POST is a
1.5 KB Wassenger `message:in:new` body with a unique id, verified, inserted and
committed (SQLite WAL by default, or --database-url), enqueued for processing,
then answered. The ceiling is a Falcon app that reads the body and answers the
same JSON without touching anything.

--synchronous normal,full runs the real server once per PRAGMA synchronous of
the webhook writer's SQLite connection, in the same run: NORMAL (what a 2xx
meant before: a power cut could undo it) against FULL (the default now: one
fsync of the WAL per group commit). Ignored with --database-url.

--store db,unqueued,handoff,none takes the real server apart, to see what
each part costs (the default, db, is the real thing): `unqueued` stores
every event but enqueues none (the Enqueuer's share); `handoff` keeps the
writer thread and its answers to the request threads but touches no
database; `none` answers every request as if it had been stored, with no
writer thread. Only db stores and enqueues: the others are measurements, not
modes.

--floors wait,commit,group,leader serves bench/hello_durable.py's floors next to
the ceiling: the hello world plus the least a durable answer costs on
waitress (a wait on another thread; a commit of its own; a group commit,
by a writer thread or by the request threads in turn),
with none of campaignd's code.

CPU us/req is the server process's user + system CPU over the measured load
divided by the requests answered (the load generator's CPU is not in it);
switches/req its threads' context switches (voluntary and not) the same way.
--by-thread splits that CPU by the server's threads (bench/thread_cpu.py):
waitress's main loop, its request threads, the event writer and enqueuer;
and counts the garbage collector's pauses during the load. After each
campaignd run the last lines give its event writer's group commits (read
from its /metrics, bench/commit_groups.py): requests and ms a commit.

Load: wrk (32 connections, keep-alive, a Lua script making every body unique)
when it is installed, else a multi-process Python keep-alive client.

    .venv/bin/python bench/webhook_ingest.py [--seconds 10] [--connections 32]
        [--synchronous normal,full] [--store db,unqueued,handoff,none]
        [--floors wait,commit,group,leader] [--by-thread]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench import commit_groups  # noqa: E402
from bench import hello_durable  # noqa: E402
from bench import thread_cpu  # noqa: E402
from bench.webhook_load import PATH  # noqa: E402
from bench.webhook_load import SECRET  # noqa: E402
from bench.webhook_load import run_python_client  # noqa: E402
from bench.webhook_load import run_wrk  # noqa: E402
from bench.webhook_load import sample_body  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon import config_text  # noqa: E402

# --- the ceiling server -------------------------------------------------------------


def serve_hello(port: int, threads: int) -> None:
    import falcon

    from daemon.roles.web.app import WebServer

    class Hello:
        def on_post(self, req, resp):
            req.bounded_stream.read()
            resp.media = {"stored": 1, "duplicates": 0}

    app = falcon.App()
    app.add_route(PATH, Hello())
    cfg = config_mod.from_dict({"web": {"port": port, "threads": threads}})
    server = WebServer(app, cfg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve()


STORES = {
    "db": "",
    "handoff": "hand-off only, no database",
    "none": "nothing stored, no writer",
    "unqueued": "stored, not enqueued",
}


def serve_campaignd(
    config_path: str, synchronous: str, store: str = "db", unfrozen: bool = False
) -> int:
    """`campaignd web`, with the webhook writer's PRAGMA synchronous set, with
    a part of the writer taken out (`store`, see the module's text) and, when
    `unfrozen`, its startup heap left to the collector (as before 222a592)."""
    from daemon import runtime
    from daemon.cli import run_role

    if unfrozen:
        runtime.freeze_startup_heap = lambda: None
    from daemon.roles.web import event_writer

    event_writer.EventWriter.sqlite_synchronous = synchronous
    if store == "handoff":
        event_writer.EventWriter._store = lambda self, rows: {}
    elif store == "unqueued":
        event_writer.Enqueuer.submit = lambda self, ids: None
    elif store == "none":
        event_writer.EventWriter.store = lambda self, rows: []
    return run_role(config_mod.load(config_path), "web")


# --- orchestration ------------------------------------------------------------------


def wait_healthy(url: str, proc: subprocess.Popen, path: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    host_port = url.removeprefix("http://")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        conn = http.client.HTTPConnection(host_port, timeout=1)
        try:
            conn.request("POST" if path == PATH else "GET", path, body=b"{}")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of `pid` so far
    (/proc/PID/status counts the main thread only)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        lines = text.splitlines()
        total += sum(int(ln.split()[1]) for ln in lines if "ctxt_switches" in ln)
    return total


def measured(proc: subprocess.Popen, url: str, args, commits: bool = False) -> dict:
    """The measured load's figures, with the server's CPU a request (user and
    system time of its process over the load, warm-up excluded), its
    threads' context switches a request (Linux only, else 0) and, with
    `commits` (campaignd), its event writer's group commits."""
    server = psutil.Process(proc.pid)
    commits_before = commit_groups.scrape(url) if commits else None
    by_thread = Path(os.environ.get(thread_cpu.ENV, "")) if args.by_thread else None
    threads_before = thread_cpu.snapshot(proc.pid, by_thread) if by_thread else {}
    before, switches = server.cpu_times(), context_switches(proc.pid)
    result = load(url, args, "run")
    after, switches = server.cpu_times(), context_switches(proc.pid) - switches
    requests = max(result["requests"], 1)
    if by_thread:
        threads_after = thread_cpu.snapshot(proc.pid, by_thread)
        result["threads"] = thread_cpu.per_request(
            threads_before, threads_after, requests
        )
        result["gc"] = thread_cpu.collections(threads_before, threads_after)
    result["user_us"] = (after.user - before.user) / requests * 1e6
    result["sys_us"] = (after.system - before.system) / requests * 1e6
    result["switches"] = switches / requests
    if commits_before is not None:
        result["commits"] = commit_groups.between(
            commits_before, commit_groups.scrape(url)
        )
    return result


def load(url: str, args, run_id: str) -> dict:
    if args.client == "wrk":
        return run_wrk(url, args.seconds, args.connections, run_id)
    return run_python_client(url, args.seconds, args.connections)


def bench_campaignd(
    args, workdir: Path, synchronous: str, store: str = "db"
) -> tuple[dict, int]:
    workdir = workdir / f"{synchronous}-{store}"
    workdir.mkdir()
    port = free_port()
    data = {
        "daemon": {"data_dir": str(workdir / "data"), "log_level": "warning"},
        "web": {"port": port, "threads": args.threads, "webhook_secret": SECRET},
    }
    if args.database_url:
        data["database"] = {"url": args.database_url}
    cfg_path = workdir / "campaignd.toml"
    cfg_path.write_text(config_text.to_toml(data))
    env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
    # Metrics in shared files, as under the supervisor (each increment a
    # write under a process-wide lock).
    (workdir / "metrics").mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-campaignd",
            str(cfg_path),
            "--synchronous",
            synchronous,
            "--store",
            store,
            *(["--unfrozen"] if args.unfrozen else []),
        ],
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, "/healthz")
        load(url, argparse.Namespace(**{**vars(args), "seconds": 1}), "warm")
        result = measured(proc, url, args, commits=True)
    finally:
        stop(proc)
    cfg = config_mod.load(cfg_path)
    from daemon.store.db import open_database
    from daemon.store.models import InboundEvent
    from daemon.store.models import database

    open_database(cfg)
    with database.connection_context():
        stored = InboundEvent.select().count()
    return result, stored


def bench_hello(args, floor: str = "", workdir: Path | None = None) -> dict:
    """The ceiling, or with `floor` one of bench/hello_durable.py's floors."""
    port = free_port()
    extra = ["--floor", floor, "--data-dir", str(workdir)] if floor else []
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-hello",
            str(port),
            "--threads",
            str(args.threads),
            *extra,
        ],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, PATH)
        load(url, argparse.Namespace(**{**vars(args), "seconds": 1}), "warm")
        return measured(proc, url, args)
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=config_mod.WebConfig().threads,
        help="waitress threads (default: web.threads)",
    )
    parser.add_argument("--database-url", default="", help="default: SQLite file")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--synchronous",
        default="full",
        help="SQLite PRAGMA synchronous of the webhook writer; a comma-separated "
        "list (normal,full) measures each in this run (default: full)",
    )
    parser.add_argument(
        "--store",
        default="db",
        help="what the webhook writer does: db (the real thing), unqueued, "
        "handoff, none; a comma-separated list measures each (only db stores "
        "and enqueues)",
    )
    parser.add_argument(
        "--floors",
        default="",
        help="also serve bench/hello_durable.py's floors, the ceiling plus the "
        "least a durable answer costs: wait, commit, group, leader "
        "(comma-separated)",
    )
    parser.add_argument(
        "--by-thread",
        action="store_true",
        help="also split each server's CPU a request by its threads",
    )
    parser.add_argument(
        "--unfrozen",
        action="store_true",
        help="leave campaignd's startup heap to the garbage collector (no "
        "runtime.freeze_startup_heap): what a full collection cost before it",
    )
    parser.add_argument("--serve-hello", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-campaignd", help=argparse.SUPPRESS)
    parser.add_argument("--floor", default="", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hello or args.serve_campaignd:
        thread_cpu.install()
    if args.serve_hello and args.floor:
        hello_durable.serve(
            args.floor, args.serve_hello, args.threads, PATH, Path(args.data_dir)
        )
        return 0
    if args.serve_hello:
        serve_hello(args.serve_hello, args.threads)
        return 0
    if args.serve_campaignd:
        return serve_campaignd(
            args.serve_campaignd, args.synchronous, args.store, args.unfrozen
        )
    levels = [level.strip().lower() for level in args.synchronous.split(",")]
    if args.database_url:
        levels = levels[:1]
    stores = [store.strip().lower() for store in args.store.split(",")]
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        parser.error(f"--store: unknown {', '.join(unknown)} ({', '.join(STORES)})")
    floors = [f.strip().lower() for f in args.floors.split(",") if f.strip()]
    unknown = sorted(set(floors) - set(hello_durable.FLOORS))
    if unknown:
        known = ", ".join(hello_durable.FLOORS)
        parser.error(f"--floors: unknown {', '.join(unknown)} ({known})")
    # The real writer at each synchronous level, the parts taken out at the first.
    variants = [(level, "db") for level in levels if "db" in stores]
    variants += [(levels[0], store) for store in stores if store != "db"]
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    body_size = len(sample_body("ACB19255F805BFD6139C144316DE574F").encode())
    print(
        f"webhook ingest: {body_size} B bodies, {args.connections} connections, "
        f"{args.seconds:g} s, client {args.client}, waitress threads {args.threads}, "
        f"database {args.database_url or 'SQLite (WAL)'}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="campaignd-bench-"))
    if args.by_thread:
        (workdir / "thread-cpu").mkdir()
        os.environ[thread_cpu.ENV] = str(workdir / "thread-cpu")
    try:
        hello = bench_hello(args)
        floored = {}
        for floor in floors:
            (workdir / floor).mkdir()
            floored[floor] = bench_hello(args, floor, workdir / floor)
        reals = {v: bench_campaignd(args, workdir, *v) for v in variants}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [("hello-world falcon (ceiling)", hello)]
    rows += [(hello_durable.FLOORS[floor], r) for floor, r in floored.items()]
    for (level, store), (real, _) in reals.items():
        parts = [] if args.database_url else [level]
        rows.append(
            (", ".join(["campaignd web", *parts, *filter(None, [STORES[store]])]), real)
        )
    print(
        f"{'server':<50}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
        f"{'CPU us/req':>12}{'of it sys':>11}{'switches/req':>14}{'of ceiling':>12}"
    )
    for name, r in rows:
        print(
            f"{name:<50}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{r['errors']:>8}{r['user_us'] + r['sys_us']:>12.0f}{r['sys_us']:>11.0f}"
            f"{r['switches']:>14.1f}{r['rps'] / hello['rps'] * 100:>11.0f}%"
        )
    if args.by_thread:
        thread_cpu.print_table(rows)
    for (level, store), (real, stored) in reals.items():
        groups = real["commits"]
        print(
            f"{level}, {store}: ratio campaignd / ceiling "
            f"{real['rps'] / hello['rps']:.2f}, events stored {stored} "
            f"(the warm-up included); {groups['commits']} group commits, "
            f"{groups['requests_a_commit']:.1f} requests and "
            f"{groups['ms_a_commit']:.2f} ms a commit"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
