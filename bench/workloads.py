"""The five side-by-side workloads (W1-W5), each run for every system in turn.

Systems: "peer" (the Celery + Redis + FastAPI + PostgreSQL replica),
"cd-embedded" (campaignd, SQLite + SqliteHuey) and "cd-cluster" (campaignd,
PostgreSQL + Redis); W2 adds "ceiling" (hello-world Falcon, same waitress).
Runs alternate (run r starts with system r mod n), so slow drift of a shared
machine spreads over all systems; the table shows medians.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from bench import campaignd_side as cd
from bench import peer_side as peer
from bench.harness import MAIN_PYTHON
from bench.harness import ROOT
from bench.harness import BenchError
from bench.harness import FakeProviderProcess
from bench.harness import PrivateRedis
from bench.harness import Report
from bench.harness import Row
from bench.harness import Spawned
from bench.harness import TreeMeter
from bench.harness import cpu_of
from bench.harness import free_port
from bench.harness import http_ok
from bench.harness import memory_of
from bench.harness import reap_quietly
from bench.harness import spawn
from bench.harness import tree
from bench.harness import wait_until

PEER = "peer"
MB = 2**20
FINAL_CD = ("sent", "delivered", "read", "failed")
FINAL_PEER = ("sent", "failed")


@dataclass
class Bench:
    base: Path
    session: str
    redis: PrivateRedis
    quick: bool
    runs: int
    modes: list[str]  # campaignd modes: "embedded", "cluster"
    log: Callable[[str], None]
    report: Report
    failures: list[str] = field(default_factory=list)
    peer: bool = True  # False (--no-peer): campaignd's systems only

    @property
    def log_dir(self) -> Path:
        return self.base / "logs"

    def cd_systems(self) -> list[str]:
        return [f"cd-{m}" for m in self.modes]

    def attempt(self, label: str, fn: Callable, *args):
        """Run one measurement; a failure is logged and counts as missing."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - one bad run must not end the bench
            self.failures.append(f"{label}: {exc}")
            self.log(f"  !! {label} failed: {exc}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            return None


def rotated(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


def collect(b: Bench, systems: list[str], runs: int, label: str, measure) -> dict:
    """{system: [result per run]} with the systems alternating per run."""
    if not b.peer:
        systems = [s for s in systems if s != PEER]
    results: dict[str, list] = {s: [] for s in systems}
    for r in range(runs):
        for system in rotated(systems, r):
            started = time.monotonic()
            res = b.attempt(f"{label} {system} run {r + 1}", measure, system)
            took = time.monotonic() - started
            if res is not None:
                results[system].append(res)
                b.log(f"  {label} run {r + 1} {system} ({took:.0f}s): {_brief(res)}")
                for line in res.get("per_process", []):
                    b.log(f"      {line}")
    return results


def _brief(res: dict) -> str:
    parts = []
    for key, value in res.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str)) or value is None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def column(results: dict, key: str) -> dict[str, list]:
    """{system: values}; a system that did not run reads as no values."""
    return collections.defaultdict(
        list,
        {
            s: [r[key] for r in runs if r.get(key) is not None]
            for s, runs in results.items()
        },
    )


def _med(values: list):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _cmp(ours, theirs, op: Callable[[float, float], bool]) -> str:
    if ours is None or theirs is None:
        return "n/a"
    return "ok" if op(ours, theirs) else "MISSED"


# =============================================================== W1 dispatch


def w1_dispatch(b: Bench) -> None:
    n = 1000 if b.quick else 5000
    b.log(f"W1 dispatch: {n} Message 1 sends, 4 workers, fake provider at 0 ms")
    fake = FakeProviderProcess(b.log_dir)
    systems = [PEER, *b.cd_systems()]
    try:

        def send_path(system: str) -> dict:
            fake.reset()
            if system == PEER:
                return _w1_peer(b, fake, n)
            return _w1_cd(b, fake, system.removeprefix("cd-"), n)

        results = collect(b, systems, b.runs, "W1", send_path)

        def campaign(system: str) -> dict:
            fake.reset()
            if system == PEER:
                return _w1_peer_campaign(b, fake, n)
            return _w1_cd_campaign(b, fake, system.removeprefix("cd-"), n)

        # One run (none with --quick): the fan-out is one statement per batch,
        # but its cost grows with the campaign on PostgreSQL (see the docs).
        fanout = {s: [] for s in systems}
        if not b.quick:
            fanout = collect(b, systems, 1, "W1 fan-out", campaign)
    finally:
        fake.close()
    _w1_rows(b, results, fanout)


# ------------------------------------------------ send path: queued, then workers


def _w1_cd(b: Bench, fake, mode: str, n: int) -> dict:
    run = cd.new_run(mode, b.base, fake.url, b.redis, b.session)
    with cd.opened(run):
        campaign_id = run.seed_campaign(n)
        run.create_rows_and_enqueue(campaign_id)
        # workers.messages_processes = 2 x messages_threads = 2: the default.
        workers = run.start_workers(run.cfg.workers.messages_processes)
        try:
            return _w1_measure(
                fake,
                lambda: [w.pid for w in workers],
                lambda: run.service_processes(b.redis),
                n,
                lambda: run.sent_count(campaign_id),
            )
        finally:
            reap_quietly(workers)


def _w1_peer(b: Bench, fake, n: int) -> dict:
    run = peer.new_run(b.base, b.redis, fake.url, b.session)
    worker = ctl = None
    try:
        campaign_id = run.seed_campaign(n)
        ids = run.create_rows(campaign_id)
        ctl = run.control()
        ctl.send(ids)
        worker = run.start_worker()
        return _w1_measure(
            fake,
            lambda: [worker.pid],
            run.service_processes,
            n,
            lambda: run.sent_count(campaign_id),
        )
    finally:
        reap_quietly([ctl, worker])
        run.close()


def _w1_measure(fake, roots, services, n: int, sent_rows) -> dict:
    """From the provider's first accepted send to its last, all queued up front.

    Worker start-up is outside the span: CPU is counted from the moment the
    first send is seen, msgs/s from the provider's first to last acceptance.
    """
    wait_until(lambda: fake.accepted() >= 1, 120, "the first send", interval=0.005)
    meter = TreeMeter(roots, extra=services).start()
    wait_until(lambda: fake.accepted() >= n, 30 + n / 50, "every send", interval=0.02)
    wait_until(lambda: sent_rows() >= n, 60, "rows marked sent", interval=0.02)
    meter.stop()
    first, last = _accept_span(fake.messages())
    return {
        "msgs_s": (n - 1) / max(last - first, 1e-3),
        "cpu_ms_msg": meter.cpu_s / n * 1000,
        "svc_cpu_ms_msg": meter.extra_cpu_s / n * 1000,
        "peak_rss_mb": meter.peak_rss / MB,
    }


def _accept_span(messages: list[dict]) -> tuple[float, float]:
    import datetime as dt

    stamps = sorted(
        dt.datetime.fromisoformat(m["createdAt"].replace("Z", "+00:00")).timestamp()
        for m in messages
    )
    return stamps[0], stamps[-1]


# ------------------------------------------------ the whole campaign: fan-out too


def _w1_cd_campaign(b: Bench, fake, mode: str, n: int) -> dict:
    run = cd.new_run(mode, b.base, fake.url, b.redis, b.session)
    with cd.opened(run):
        warm = run.seed_campaign(10, 0, "warm-up")
        campaign_id = run.seed_campaign(n, 10, "measured")
        workers = run.start_workers(run.cfg.workers.messages_processes)
        try:
            run.start_campaign(warm)
            wait_until(lambda: run.sent_count(warm) == 10, 120, "warm-up sends")
            started = time.monotonic()
            run.start_campaign(campaign_id)
            return _w1_campaign_done(
                fake, started, n, 10, lambda: run.sent_count(campaign_id)
            )
        finally:
            reap_quietly(workers)


def _w1_peer_campaign(b: Bench, fake, n: int) -> dict:
    run = peer.new_run(b.base, b.redis, fake.url, b.session)
    worker = ctl = None
    try:
        warm = run.seed_campaign(10, 0)
        campaign_id = run.seed_campaign(n, 10)
        worker = run.start_worker()
        ctl = run.control()
        ctl.fanout(warm)
        wait_until(lambda: run.sent_count(warm) == 10, 120, "warm-up sends")
        started = time.monotonic()
        ctl.fanout(campaign_id)
        return _w1_campaign_done(
            fake, started, n, 10, lambda: run.sent_count(campaign_id)
        )
    finally:
        reap_quietly([ctl, worker])
        run.close()


def _w1_campaign_done(fake, started: float, n: int, warm: int, sent_rows) -> dict:
    wait_until(
        lambda: fake.accepted() >= warm + n, 60 + n / 20, "the campaign", interval=0.05
    )
    wait_until(lambda: sent_rows() >= n, 60, "rows marked sent", interval=0.05)
    return {"campaign_msgs_s": n / (time.monotonic() - started)}


# Issue 15's W1 targets: msgs/s at least this many times the peer's.
W1_TIMES = {"cd-embedded": 5.0, "cd-cluster": 3.0}


def _w1_rows(b: Bench, results: dict, fanout: dict) -> None:
    rate = column(results, "msgs_s")
    cpu = column(results, "cpu_ms_msg")
    peer_rate, peer_cpu = _med(rate[PEER]), _med(cpu[PEER])
    b.report.add(
        Row(
            "W1",
            "msgs/s",
            rate,
            "{:.0f}",
            target=">= 5x / 3x peer",
            verdict=" ".join(
                _cmp(_med(rate[s]), peer_rate, lambda a, p, s=s: a >= W1_TIMES[s] * p)
                for s in b.cd_systems()
            ),
            note="every send queued first; provider's first to last acceptance",
        )
    )
    b.report.add(
        Row(
            "W1",
            "CPU ms/msg (workers)",
            cpu,
            "{:.2f}",
            target="< peer",
            verdict=" ".join(
                _cmp(_med(cpu[s]), peer_cpu, lambda a, p: a < p) for s in b.cd_systems()
            ),
        )
    )
    b.report.add(
        Row("W1", "CPU ms/msg (Redis+PG)", column(results, "svc_cpu_ms_msg"), "{:.2f}")
    )
    b.report.add(
        Row("W1", "peak RSS MB (workers)", column(results, "peak_rss_mb"), "{:.0f}")
    )
    b.report.add(
        Row(
            "W1",
            "msgs/s, start -> all sent",
            column(fanout, "campaign_msgs_s"),
            "{:.0f}",
            note="one run: the campaign is started with the workers up, so its "
            "fan-out (rows + queue entries) is inside the span",
        )
    )


# =============================================================== W2 ingest


def w2_ingest(b: Bench) -> None:
    seconds = 2.0 if b.quick else 4.0
    b.log(
        f"W2 webhook ingest: 1.5 KB message:in:new POSTs, 32 connections, "
        f"{seconds:g}s per run"
    )

    def measure(system: str) -> dict:
        if system == "ceiling":
            return _w2_ceiling(b, seconds)
        if system == PEER:
            return _w2_peer(b, seconds)
        return _w2_cd(b, system.removeprefix("cd-"), seconds)

    systems = ["ceiling", PEER, *b.cd_systems()]
    if b.quick and "embedded" in b.modes:
        systems = ["ceiling", PEER, "cd-embedded"]
    results = collect(b, systems, b.runs, "W2", measure)
    _w2_rows(b, results)


def run_load(url: str, seconds: float, tag: str) -> dict:
    """32 keep-alive connections for `seconds` after a warm-up: wrk when installed
    (bench/webhook_ingest.py's script: unique 1.5 KB bodies), else bench.loadgen."""
    run_wrk = _wrk_runner()
    if run_wrk is not None:
        run_wrk(url, 1, 32, f"{tag}warm{time.monotonic_ns()}")
        res = run_wrk(url, max(1, round(seconds)), 32, f"{tag}{time.monotonic_ns()}")
        return res | {"client": "wrk"}
    cmd = [
        str(MAIN_PYTHON),
        "-m",
        "bench.loadgen",
        "--url",
        url,
        "--connections",
        "32",
        "--seconds",
        f"{seconds:g}",
        "--warmup",
        "0.5",
        "--tag",
        tag,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, cwd=ROOT
    )
    if out.returncode != 0:
        raise BenchError(f"load generator failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout) | {"client": "bench.loadgen"}


def _wrk_runner():
    if shutil.which("wrk") is None:
        return None
    try:
        from bench.webhook_ingest import run_wrk
    except ImportError:
        return None
    return run_wrk


def _loaded(server: Spawned, url: str, seconds: float, tag: str) -> dict:
    meter = TreeMeter(lambda: [server.pid], interval=0.25).start()
    res = run_load(url, seconds, tag)
    meter.stop()
    # Warm-up requests cost CPU too; a small overestimate per request.
    res["cpu_us_req"] = meter.cpu_s / max(res["requests"], 1) * 1e6
    return res


def _w2_ceiling(b: Bench, seconds: float) -> dict:
    port = free_port()
    server = spawn(
        "hello-falcon",
        [str(MAIN_PYTHON), "-m", "bench.hello_falcon", "--port", str(port)],
        b.log_dir,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(base + "/healthz"), 30, "hello falcon")
        return _loaded(server, base + "/webhooks/wassenger", seconds, "C")
    finally:
        server.stop()


def _w2_cd(b: Bench, mode: str, seconds: float) -> dict:
    run = cd.new_run(mode, b.base, "http://127.0.0.1:9", b.redis, b.session)
    with cd.opened(run):
        web = run.start_web()
        try:
            res = _loaded(web, run.web_url + "/webhooks/wassenger", seconds, "D")
        finally:
            web.stop()
        # Durable: every answered request is a stored row (warm-up included).
        res["stored"] = run.stored_events()
        res["durable"] = "yes" if res["stored"] >= res["requests"] else "NO"
    return res


def _w2_peer(b: Bench, seconds: float) -> dict:
    run = peer.new_run(b.base, b.redis, "http://127.0.0.1:9", b.session)
    web = None
    try:
        web = run.start_web()
        res = _loaded(web, run.web_url + "/webhooks/wassenger", seconds, "E")
        answered_at = time.monotonic()
        # BackgroundTasks finish after the answers: wait for the count to settle.
        last = [-1]

        def settled() -> bool:
            now = run.webhook_logs()
            done = now == last[0]
            last[0] = now
            return done

        wait_until(settled, 60, "background tasks", interval=0.5)
        res["processed"] = last[0]
        res["drain_s"] = time.monotonic() - answered_at
        res["durable"] = "no"
        return res
    finally:
        reap_quietly([web])
        run.close()


def _w2_rows(b: Bench, results: dict) -> None:
    rps = column(results, "rps")
    ceiling = _med(rps["ceiling"])
    share = collections.defaultdict(
        list, {s: [r / ceiling * 100 for r in rps[s]] if ceiling else [] for s in rps}
    )
    p99 = column(results, "p99_ms")
    b.report.add(Row("W2", "req/s", rps, "{:.0f}"))
    b.report.add(
        Row(
            "W2",
            "% of ceiling",
            share,
            "{:.0f}%",
            ratio=False,
            target=">= 70 %",
            verdict=" ".join(
                _cmp(_med(share[s]), 70, lambda a, t: a >= t) for s in b.cd_systems()
            ),
        )
    )
    b.report.add(Row("W2", "p50 ms", column(results, "p50_ms"), "{:.1f}"))
    b.report.add(
        Row(
            "W2",
            "p99 ms",
            p99,
            "{:.1f}",
            target="< 50 ms",
            verdict=" ".join(
                _cmp(_med(p99[s]), 50, lambda a, t: a < t) for s in b.cd_systems()
            ),
        )
    )
    b.report.add(
        Row("W2", "server CPU us/req", column(results, "cpu_us_req"), "{:.0f}")
    )
    b.report.add(
        Row(
            "W2",
            "stored before 200",
            column(results, "durable"),
            "{}",
            ratio=False,
            note="peer: FastAPI BackgroundTasks run after the 200 in the "
            "web process: an event in flight is lost if it dies; "
            "ceiling: hello world, stores nothing",
        )
    )


# =============================================================== W3 respawn


def w3_respawn(b: Bench) -> None:
    kills = 3 if b.quick else 5
    top_kills = 1 if b.quick else 3
    b.log(
        f"W3 respawn: {kills} worker kills, {top_kills} top-process kills per "
        f"restart mechanism"
    )
    fake = FakeProviderProcess(b.log_dir)
    results: dict[str, dict] = {}
    try:
        results[PEER] = (
            b.attempt("W3 peer", _w3_peer, b, fake.url, kills, top_kills) or {}
        )
        for mode in b.modes:
            if b.quick and mode != "embedded":
                continue
            results[f"cd-{mode}"] = (
                b.attempt(f"W3 cd-{mode}", _w3_cd, b, fake.url, mode, kills, top_kills)
                or {}
            )
    finally:
        fake.close()
    _w3_rows(b, results)


def _w3_cd(b: Bench, fake_url: str, mode: str, kills: int, top_kills: int) -> dict:
    # healthy_after_s 1 s (default 60 s) and a pause between kills: each kill
    # then measures a first restart, not the backoff of a crash loop.
    extra = {"supervisor": {"healthy_after_s": 1.0}}
    run = cd.new_run(mode, b.base, fake_url, b.redis, b.session, extra)
    out: dict[str, list] = {
        "child_probe_ms": [],
        "child_running_ms": [],
        "top_ready_ms": [],
    }
    with cd.opened(run):
        loop = cd.RestartLoop("campaignd-run", run.run_command(), run.log_dir, 0.1)
        loop.start()
        try:
            wait_until(run.is_ready, 90, "campaignd READY", interval=0.05)
            for k in range(kills):
                probe_ms, running_ms = _w3_cd_child_kill(run, k)
                out["child_probe_ms"].append(probe_ms)
                out["child_running_ms"].append(running_ms)
                b.log(
                    f"  W3 cd-{mode} kill worker:background #{k + 1}: RUNNING after "
                    f"{running_ms:.0f} ms, probe done after {probe_ms:.0f} ms"
                )
            for k in range(top_kills):
                ready_ms = _w3_cd_top_kill(run, loop)
                out["top_ready_ms"].append(ready_ms)
                b.log(
                    f"  W3 cd-{mode} SIGKILL supervisor #{k + 1}: READY after "
                    f"{ready_ms:.0f} ms"
                )
        finally:
            loop.stop()
    return out


def _w3_cd_child_kill(run: cd.CdRun, k: int) -> tuple[float, float]:
    wait_until(run.is_ready, 60, "READY before a kill", interval=0.05)
    time.sleep(1.2)  # past healthy_after_s: the next exit is a "first" one
    old = run.role(run.status(), "worker:background")["pid"]
    killed_wall = time.time()
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    event_id = cd.post_probe_event(run, f"F{k:02d}{os.getpid() % 256:02X}")
    running_at: list[float] = []

    def done() -> bool:
        if not running_at:
            role = run.role(run.status() or {}, "worker:background") or {}
            if role.get("pid") not in (None, old) and role.get("state") == "RUNNING":
                running_at.append(time.monotonic())
        return bool(running_at) and run.event_processed_at(event_id) is not None

    wait_until(
        done,
        60,
        "the probe event processed by the new worker:background",
        interval=0.01,
    )
    processed = cd.utc_epoch(run.event_processed_at(event_id))
    return (processed - killed_wall) * 1000, (running_at[0] - killed) * 1000


def _w3_cd_top_kill(run: cd.CdRun, loop: cd.RestartLoop) -> float:
    wait_until(run.is_ready, 60, "READY before a kill", interval=0.05)
    time.sleep(1.0)
    old = loop.current
    killed = time.monotonic()
    old.kill()

    def back():
        current = loop.current
        return current is not old and run.is_ready()

    wait_until(back, 90, "READY after the supervisor was SIGKILLed", interval=0.02)
    return (time.monotonic() - killed) * 1000


def _w3_peer(b: Bench, fake_url: str, kills: int, top_kills: int) -> dict:
    run = peer.new_run(b.base, b.redis, fake_url, b.session)
    ctl = run.control()
    out: dict[str, list] = {
        "child_probe_ms": [],
        "child_running_ms": [],
        "top_ready_ms": [],
        "top_ready_ms_audit_loop": [],
        "top_ready_ms_none": [],
    }
    try:
        worker = run.start_worker()
        try:
            peer.wait_pool(worker)
            ctl.probe("probe:up", [], 60)
            for k in range(kills):
                ms, forked_ms = _w3_peer_child_kill(ctl, worker, k)
                out["child_probe_ms"].append(ms)
                out["child_running_ms"].append(forked_ms)
                b.log(
                    f"  W3 peer kill pool child #{k + 1}: replacement forked after "
                    f"{forked_ms:.0f} ms, probe done by it after {ms:.0f} ms"
                )
        finally:
            worker.stop()
        mechanisms = [("top_ready_ms", 0.1)]
        if not b.quick:  # --quick skips what only confirms the audit's reading
            none_wait = 8.0
            out["top_ready_ms_none"].append(_w3_peer_no_restart(run, ctl, none_wait))
            b.log(
                f"  W3 peer SIGKILL celery main, start.sh as deployed: not back "
                f"after {none_wait:g}s"
            )
            mechanisms.append(("top_ready_ms_audit_loop", 5.0))
        for label, restart_s in mechanisms:
            # The 5 s loop only confirms its sleep: two kills are enough.
            for k in range(top_kills if restart_s < 1 else min(top_kills, 2)):
                ms = _w3_peer_top_kill(run, ctl, restart_s, k)
                out[label].append(ms)
                b.log(
                    f"  W3 peer SIGKILL celery main, restart after {restart_s:g}s "
                    f"#{k + 1}: probe done after {ms:.0f} ms"
                )
    finally:
        ctl.close()
        run.close()
    return out


def _w3_peer_child_kill(ctl, worker: Spawned, k: int) -> tuple[float, float]:
    time.sleep(0.3)
    children = peer.wait_pool(worker)
    victim = random.choice(children)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # No probe can run in the replacement before it exists: first see it forked.
    wait_until(
        lambda: set(peer.pool_children(worker)) - set(children),
        30,
        "a replacement pool process",
        interval=0.005,
    )
    forked = time.monotonic()
    answer = ctl.probe(f"probe:child:{k}:{killed}", [worker.pid, *children], 30)
    if answer.get("timeout"):
        raise BenchError("no probe ran in a replacement pool process within 30 s")
    return (answer["done_at"] - killed) * 1000, (forked - killed) * 1000


def _w3_peer_no_restart(run, ctl, wait_s: float) -> float | None:
    worker = run.start_worker()
    try:
        peer.wait_pool(worker)
        ctl.probe("probe:none:up", [], 60)
        pids = [p.pid for p in tree([worker.pid])]
        worker.kill()
        answer = ctl.probe(f"probe:none:{time.monotonic()}", pids, wait_s)
        return None if answer.get("timeout") else 0.0
    finally:
        worker.kill_group()


def _w3_peer_top_kill(run, ctl, restart_s: float, k: int) -> float:
    loop = cd.RestartLoop(
        "celery-loop", peer.celery_worker_cmd(), run.log_dir, restart_s, env=run.env
    ).start()
    try:
        ctl.probe(f"probe:loop:up:{k}", [], 60)
        time.sleep(0.5)
        old = loop.current
        pids = [p.pid for p in tree([old.pid])]
        killed = time.monotonic()
        old.kill()
        answer = ctl.probe(f"probe:loop:{restart_s}:{k}:{killed}", pids, 60)
        old.kill_group()  # orphaned pool processes, if any
        if answer.get("timeout"):
            raise BenchError("the restarted worker ran no probe within 60 s")
        return (answer["done_at"] - killed) * 1000
    finally:
        loop.stop()


def _w3_rows(b: Bench, results: dict) -> None:
    def col(key):
        return {s: r.get(key, []) for s, r in results.items()}

    systems = list(results)
    child = col("child_probe_ms")
    b.report.add(
        Row(
            "W3",
            "kill worker -> probe done ms",
            child,
            "{:.0f}",
            target="p50 < 250 ms",
            verdict=" ".join(
                _cmp(_med(child.get(s, [])), 250, lambda a, t: a < t)
                for s in systems
                if s != PEER
            ),
            note="campaignd: SIGKILL worker:background (the only consumer of "
            "its queue), then a webhook whose processing only the "
            "respawned process can do; peer: SIGKILL one prefork "
            "pool child, probes until one runs in the new child",
        )
    )
    running = col("child_running_ms")
    b.report.add(
        Row(
            "W3",
            "kill worker -> replacement up ms",
            running,
            "{:.0f}",
            target="p50 < 50 ms",
            verdict=" ".join(
                _cmp(_med(running.get(s, [])), 50, lambda a, t: a < t)
                for s in systems
                if s != PEER
            ),
            note="campaignd: the supervisor has seen the new child's first "
            "heartbeat (RUNNING); peer: the new pool process exists",
        )
    )
    top = col("top_ready_ms")
    b.report.add(
        Row(
            "W3",
            "kill top -> back ms (0.1 s restart)",
            top,
            "{:.0f}",
            target="READY < 1.5 s",
            verdict=" ".join(
                _cmp(_med(top.get(s, [])), 1500, lambda a, t: a < t)
                for s in systems
                if s != PEER
            ),
            note="restart loop standing in for systemd Restart=always "
            "(RestartSec=100ms); campaignd: until the status socket "
            "says every role RUNNING; peer: until a probe task runs",
        )
    )
    b.report.add(
        Row(
            "W3",
            "kill top -> back ms (audit loop)",
            col("top_ready_ms_audit_loop"),
            "{:.0f}",
            ratio=False,
            note="the loop the audit recommends for start.sh: "
            "`while true; do celery worker ...; sleep 5; done`",
        )
    )
    none = results.get(PEER, {}).get("top_ready_ms_none", [])
    never = {
        PEER: ["never" if any(v is None for v in none) else "came back"] if none else []
    }
    b.report.add(
        Row(
            "W3",
            "kill top -> back (start.sh as deployed)",
            never,
            "{}",
            ratio=False,
            note="start.sh starts celery with `&` and nothing restarts it "
            "(audit 2.5); campaignd has no such configuration",
        )
    )


# =============================================================== W4 chaos


def w4_chaos(b: Bench) -> None:
    n = 300 if b.quick else 1000
    chaos_s = 5.0 if b.quick else 12.0
    b.log(
        f"W4 chaos: {n} sends, fake provider at 20 ms (no dedupe), SIGKILL a "
        f"random sending process every 0.5 s for up to {chaos_s:g}s"
    )
    fake = FakeProviderProcess(b.log_dir, latency_ms=20.0, dedupe=False)
    systems = [PEER, *b.cd_systems()]
    if b.quick:
        systems = [PEER, "cd-embedded"] if "embedded" in b.modes else systems

    def measure(system: str) -> dict:
        fake.reset()
        if system == PEER:
            # The replica has no status webhook handler: no statuses for it.
            fake.reset(webhook_url="", ack_delays_ms=[])
            return _w4_peer(b, fake, n, chaos_s)
        return _w4_cd(b, fake, system.removeprefix("cd-"), n, chaos_s)

    try:
        # One long run per system by default: each is a ~30 s chaos session.
        results = collect(
            b, systems, 1 if b.quick else max(1, b.runs - 2), "W4", measure
        )
    finally:
        fake.close()
    _w4_rows(b, results)


def _chaos(
    pids: Callable[[], list[int]],
    done: Callable[[], bool],
    chaos_s: float,
    every_s: float = 0.5,
) -> int:
    """SIGKILL a random pid of `pids()` every `every_s` until done or chaos_s."""
    kills = 0
    end = time.monotonic() + chaos_s
    while time.monotonic() < end and not done():
        candidates = pids()
        if candidates:
            with contextlib.suppress(ProcessLookupError):
                os.kill(random.choice(candidates), signal.SIGKILL)
                kills += 1
        time.sleep(every_s)
    return kills


def _w4_cd(b: Bench, fake, mode: str, n: int, chaos_s: float) -> dict:
    extra = {
        # An outside SIGKILL every 0.5 s is not a crash loop: without these the
        # roles would go FATAL (10 exits in 5 min) and cool down for 300 s.
        "supervisor": {"crash_loop_exits": 1000, "backoff_max_s": 0.5},
        # Recovery of released leases waits for the next sweep: 5 s, not 30 s.
        "scheduler": {"sweep_s": 5.0},
        # Rows whose request never reached the provider get no status: they
        # are re-sent after the window (300 s by default; the minimum is 5 s).
        "provider": {"confirm_window_s": W4_CONFIRM_WINDOW_S},
    }
    run = cd.new_run(mode, b.base, fake.url, b.redis, b.session, extra)
    with cd.opened(run):
        # Statuses (sent, delivered, read) go to this run's web role: they are
        # what confirms a send whose worker was killed with it on the wire.
        fake.reset(
            webhook_url=run.web_url + "/webhooks/wassenger",
            ack_delays_ms=list(W4_ACK_DELAYS_MS),
        )
        campaign_id = run.seed_campaign(n)
        daemon = run.start_daemon()
        watcher = None
        try:
            wait_until(run.is_ready, 90, "campaignd READY", interval=0.05)
            started = time.monotonic()
            watcher = UnconfirmedWatcher(campaign_id).start()
            run.create_rows_and_enqueue(campaign_id)

            def senders() -> list[int]:
                answer = run.status() or {}
                return [
                    r["pid"]
                    for r in answer.get("roles", [])
                    if r["name"].startswith("worker:messages")
                    and r.get("pid")
                    and r.get("state") == "RUNNING"
                ]

            def finished() -> bool:
                counts = run.status_counts(campaign_id)
                return sum(counts.get(s, 0) for s in FINAL_CD) >= n

            kills = _chaos(senders, lambda: fake.accepted() >= n, chaos_s)
            with contextlib.suppress(BenchError):
                wait_until(
                    finished, 30 if b.quick else 60, "every row final", interval=0.2
                )
            elapsed = time.monotonic() - started
            watcher.stop()
            return _w4_tally(
                fake, run.references(campaign_id), FINAL_CD, kills, elapsed, n
            ) | watcher.figures(_w4_unconfirmed_rows(campaign_id))
        finally:
            if watcher is not None:
                watcher.stop()
            daemon.stop(timeout=15)


W4_CONFIRM_WINDOW_S = 15.0
W4_ACK_DELAYS_MS = (50.0, 150.0, 300.0)  # the fake's defaults: sent, delivered, read


def _epoch(value) -> float | None:
    return None if value is None else cd.utc_epoch(value)


def _w4_unconfirmed_rows(campaign_id: int) -> list[tuple]:
    """(id, status, unconfirmed_at, sent_at, resends) of every row that was
    ever unconfirmed (unconfirmed_at stays set once the row is confirmed)."""
    from daemon.store.models import Message
    from daemon.store.models import database

    with database.connection_context():
        return list(
            Message.select(
                Message.id,
                Message.status,
                Message.unconfirmed_at,
                Message.sent_at,
                Message.resends,
            )
            .where(
                Message.campaign == campaign_id, Message.unconfirmed_at.is_null(False)
            )
            .tuples()
        )


class UnconfirmedWatcher:
    """Polls the rows of a campaign every 0.2 s: when each row was first seen
    `unconfirmed`, and when it was first seen sent/delivered/read after that.

    Two measures of "unconfirmed -> confirmed" come out of it (figures()):
    - polled: first seen confirmed minus the row's unconfirmed_at (the
      daemon's commit time of the mark); up to one poll late, and a row
      marked and confirmed between two polls is not seen at all;
    - recorded: sent_at minus unconfirmed_at, both written by the daemon
      (a status webhook sets sent_at to its processing time when the row had
      none: every unconfirmed row, since its send was never recorded). A
      row re-sent for want of evidence (resends > 0) is left out of both.
    """

    def __init__(self, campaign_id: int, every_s: float = 0.2):
        self.campaign_id = campaign_id
        self.every_s = every_s
        self.seen_unconfirmed: dict[int, float] = {}  # id -> unconfirmed_at
        self.seen_confirmed: dict[int, float] = {}  # id -> wall time seen
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="w4-unconfirmed"
        )

    def start(self) -> UnconfirmedWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # a busy database: next poll
                self._poll()

    def _poll(self) -> None:
        now = time.time()
        for mid, status, unconfirmed_at, _sent, resends in _w4_unconfirmed_rows(
            self.campaign_id
        ):
            if status == "unconfirmed":
                self.seen_unconfirmed.setdefault(mid, _epoch(unconfirmed_at))
            elif (
                status in ("sent", "delivered", "read")
                and not resends
                and mid in self.seen_unconfirmed
            ):
                self.seen_confirmed.setdefault(mid, now)

    def figures(self, rows: list[tuple]) -> dict:
        polled = sorted(
            self.seen_confirmed[m] - self.seen_unconfirmed[m]
            for m in self.seen_confirmed
        )
        recorded = sorted(
            _epoch(sent) - _epoch(unconfirmed_at)
            for _, status, unconfirmed_at, sent, resends in rows
            if status in ("sent", "delivered", "read") and not resends and sent
        )
        return {
            "unconfirmed_rows": len(rows),
            "unconfirmed_seen_by_poll": len(self.seen_unconfirmed),
            "confirmed": sum(
                1 for r in rows if r[1] in ("sent", "delivered", "read") and not r[4]
            ),
            "resent_no_evidence": sum(1 for r in rows if r[4]),
            "still_unconfirmed": sum(1 for r in rows if r[1] == "unconfirmed"),
            "confirm_p50_s": _pct(recorded, 50),
            "confirm_p99_s": _pct(recorded, 99),
            "confirm_polled_p50_s": _pct(polled, 50),
            "confirm_polled_p99_s": _pct(polled, 99),
        }


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when there are none)."""
    if not values:
        return None
    k = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return values[k]


def _w4_peer(b: Bench, fake, n: int, chaos_s: float) -> dict:
    run = peer.new_run(b.base, b.redis, fake.url, b.session)
    worker = ctl = None
    try:
        campaign_id = run.seed_campaign(n)
        ids = run.create_rows(campaign_id)
        worker = run.start_worker()
        ctl = run.control()
        peer.wait_pool(worker)
        ctl.probe("probe:w4:up", [], 60)
        started = time.monotonic()
        ctl.send(ids)
        kills = _chaos(
            lambda: peer.pool_children(worker), lambda: fake.accepted() >= n, chaos_s
        )
        _settle(
            lambda: (
                fake.accepted(),
                sum(run.status_counts(campaign_id).get(s, 0) for s in FINAL_PEER),
            ),
            5 if b.quick else 10,
            60,
            n,
        )
        elapsed = time.monotonic() - started
        return _w4_tally(
            fake, run.references(campaign_id), FINAL_PEER, kills, elapsed, n
        )
    finally:
        reap_quietly([ctl, worker])
        run.close()


def _settle(
    progress: Callable[[], tuple], quiet_s: float, limit_s: float, n: int
) -> None:
    """Wait until all n rows are final, or nothing moved for quiet_s."""
    end = time.monotonic() + limit_s
    last, last_change = None, time.monotonic()
    while time.monotonic() < end:
        now = progress()
        if now[1] >= n:
            return
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return
        time.sleep(0.2)


def _w4_tally(
    fake, refs: dict[str, str], final: tuple, kills: int, elapsed: float, n: int
) -> dict:
    accepted: dict[str, int] = {}
    for m in fake.messages():
        ref = m.get("reference")
        if ref in refs:
            accepted[ref] = accepted.get(ref, 0) + 1
    lost = sum(
        1 for ref, status in refs.items() if ref not in accepted and status != "failed"
    )
    twice = sum(1 for c in accepted.values() if c > 1)
    extra = sum(c - 1 for c in accepted.values() if c > 1)
    wrong = sum(
        1 for ref, status in refs.items() if ref in accepted and status not in final
    )
    unfinished = sum(1 for status in refs.values() if status not in final)
    # What the phones show: messages of one kind to one phone beyond the first,
    # whatever their references (the fake was reset for this run).
    per_phone = fake.phone_counts()
    phone_dups = sum(
        c - 1 for kinds in per_phone.values() for c in kinds.values() if c > 1
    )
    phones_twice = sum(
        1 for kinds in per_phone.values() if any(c > 1 for c in kinds.values())
    )
    return {
        "duplicates": phone_dups,
        "phones_twice": phones_twice,
        "phones": len(per_phone),
        "lost": lost,
        "delivered_twice": twice,
        "extra_deliveries": extra,
        "accepted_not_recorded": wrong,
        "not_final": unfinished,
        "kills": kills,
        "seconds": elapsed,
        "rows": len(refs),
        "n": n,
    }


def _w4_rows(b: Bench, results: dict) -> None:
    lost = column(results, "lost")
    twice = column(results, "delivered_twice")
    b.report.add(
        Row(
            "W4",
            "lost",
            lost,
            "{:.0f}",
            ratio=False,
            target="0",
            verdict=" ".join(
                _cmp(_med(lost[s]), 0, lambda a, t: a == t)
                for s in results
                if s != PEER
            ),
            note="never accepted by the provider and not marked failed, "
            "at the end of the run",
        )
    )
    dups = column(results, "duplicates")
    b.report.add(
        Row(
            "W4",
            "duplicate deliveries",
            dups,
            "{:.0f}",
            ratio=False,
            target="0",
            verdict=" ".join(
                _cmp(_med(dups[s]), 0, lambda a, t: a == t)
                for s in results
                if s != PEER
            ),
            note="per phone and kind, from the fake's GET /_fake/phones: "
            "messages of one kind to one phone beyond the first, "
            "whatever the reference (no dedupe, as at Wassenger "
            "and Meta: a repeat is a second message)",
        )
    )
    b.report.add(
        Row(
            "W4",
            "phones that got a kind twice",
            column(results, "phones_twice"),
            "{:.0f}",
            ratio=False,
        )
    )
    b.report.add(
        Row("W4", "same reference accepted twice", twice, "{:.0f}", ratio=False)
    )
    b.report.add(
        Row(
            "W4",
            "rows ever unconfirmed",
            column(results, "unconfirmed_rows"),
            "{:.0f}",
            ratio=False,
            note="sends on the wire when their worker was killed (the supervisor "
            "read its in-flight records)",
        )
    )
    b.report.add(
        Row(
            "W4",
            "  confirmed by a status / re-sent / still open",
            {
                s: [
                    f"{r.get('confirmed')} / {r.get('resent_no_evidence')} / "
                    f"{r.get('still_unconfirmed')}"
                    for r in runs
                ]
                for s, runs in results.items()
                if s != PEER
            },
            "{}",
            ratio=False,
            note=f"re-sent: no evidence within provider.confirm_window_s "
            f"({W4_CONFIRM_WINDOW_S:g} s here)",
        )
    )
    b.report.add(
        Row(
            "W4",
            "unconfirmed -> confirmed s, p50",
            column(results, "confirm_p50_s"),
            "{:.2f}",
            ratio=False,
            note="sent_at - unconfirmed_at, both committed by the daemon "
            "(UnconfirmedWatcher); polled every 0.2 s as a check: "
            "see the _polled_ figures in --json",
        )
    )
    b.report.add(
        Row(
            "W4",
            "unconfirmed -> confirmed s, p99",
            column(results, "confirm_p99_s"),
            "{:.2f}",
            ratio=False,
        )
    )
    b.report.add(
        Row(
            "W4",
            "same, polled p50 / p99 s",
            {
                s: [
                    f"{_fmt(r.get('confirm_polled_p50_s'))} / "
                    f"{_fmt(r.get('confirm_polled_p99_s'))} "
                    f"({r.get('unconfirmed_seen_by_poll')} seen)"
                    for r in runs
                ]
                for s, runs in results.items()
                if s != PEER
            },
            "{}",
            ratio=False,
        )
    )
    b.report.add(
        Row(
            "W4",
            "accepted, row not sent",
            column(results, "accepted_not_recorded"),
            "{:.0f}",
            ratio=False,
        )
    )
    b.report.add(Row("W4", "SIGKILLs", column(results, "kills"), "{:.0f}", ratio=False))
    b.report.add(
        Row(
            "W4", "seconds to settle", column(results, "seconds"), "{:.1f}", ratio=False
        )
    )


# =============================================================== W5 footprint


# W5's idle figures: the tree first finishes what starting left (imports of
# the spare, the first scheduler jobs, SQLite checkpoints), unmeasured, then
# CPU is measured over a window. Measured right after READY (the first
# version of W5: 5 s) the "idle" CPU was mostly that start-up tail.
W5_SETTLE_S, W5_WINDOW_S = 20.0, 30.0


def w5_footprint(b: Bench) -> None:
    idle = (3.0, 5.0) if b.quick else (W5_SETTLE_S, W5_WINDOW_S)
    b.log(
        f"W5 footprint: start -> first task, then {idle[0]:g}s to settle and "
        f"idle CPU/RSS/PSS over {idle[1]:g}s"
    )
    fake = FakeProviderProcess(b.log_dir)
    systems = [PEER, *b.cd_systems()]
    if b.quick and "embedded" in b.modes:
        systems = [PEER, "cd-embedded"]

    def measure(system: str) -> dict:
        fake.reset()
        if system == PEER:
            return _w5_peer(b, fake, idle)
        return _w5_cd(b, fake, system.removeprefix("cd-"), idle)

    try:
        results = collect(b, systems, b.runs, "W5", measure)
    finally:
        fake.close()
    _w5_rows(b, results)


def _idle_figures(roots: list[int], idle: tuple[float, float], services) -> dict:
    """The tree's figures once idle: `idle` = (seconds to settle, unmeasured;
    seconds of the measured window)."""
    settle_s, window_s = idle
    time.sleep(settle_s)  # start-up's tail, not measured
    before = cpu_of(tree(roots))
    time.sleep(window_s)  # the idle window being measured, not a wait
    after = cpu_of(tree(roots))
    rss, pss = memory_of(tree(roots))
    _, svc_pss = memory_of(services())
    idle = sum(v - before.get(pid, 0.0) for pid, v in after.items())
    return {
        "rss_mb": rss / MB,
        "pss_mb": pss / MB,
        "idle_cpu_pct": idle / window_s * 100,
        "svc_pss_mb": svc_pss / MB,
        "processes": len(tree(roots)),
        "per_process": _per_process(roots),
    }


def _per_process(roots: list[int]) -> list[str]:
    """'name PSS/USS MB' per process, for the log and the JSON."""
    out = []
    for p in tree(roots):
        with contextlib.suppress(Exception):
            m = p.memory_full_info()
            cmd = p.cmdline()
            name = " ".join(a for a in cmd[1:6] if not a.startswith("/"))[:40]
            out.append(f"{name}: PSS {m.pss / MB:.1f} USS {m.uss / MB:.1f}")
    return out


def _w5_cd(b: Bench, fake, mode: str, idle: tuple[float, float]) -> dict:
    run = cd.new_run(mode, b.base, fake.url, b.redis, b.session)
    with cd.opened(run):
        campaign_id = run.seed_campaign(1)
        run.start_campaign(campaign_id)  # queued before the daemon starts
        started = time.monotonic()
        daemon = run.start_daemon()
        try:
            marks: dict[str, float] = {}

            def up() -> bool:
                now = time.monotonic()
                if "first" not in marks and fake.accepted() >= 1:
                    marks["first"] = now
                if "ready" not in marks and run.is_ready():
                    marks["ready"] = now
                    marks["start_cpu_s"] = sum(cpu_of(tree([daemon.pid])).values())
                return len(marks) == 3

            wait_until(up, 90, "campaignd READY and the first send", interval=0.02)
            res = _idle_figures(
                [daemon.pid], idle, lambda: run.service_processes(b.redis)
            )
            res["first_task_ms"] = (marks["first"] - started) * 1000
            res["ready_ms"] = (marks["ready"] - started) * 1000
            res["start_cpu_s"] = marks["start_cpu_s"]
            return res
        finally:
            daemon.stop(timeout=15)


def _w5_peer(b: Bench, fake, idle: tuple[float, float]) -> dict:
    run = peer.new_run(b.base, b.redis, fake.url, b.session)
    procs: list[Spawned] = []
    ctl = None
    try:
        campaign_id = run.seed_campaign(1)
        ctl = run.control()
        ctl.fanout(campaign_id)  # queued before the stack starts
        started = time.monotonic()
        procs = [run.start_worker(), run.start_beat(), run.start_web(wait=False)]
        marks: dict[str, float] = {}

        def up() -> bool:
            now = time.monotonic()
            if "first" not in marks and fake.accepted() >= 1:
                marks["first"] = now
            if "web" not in marks and http_ok(run.web_url + "/health"):
                marks["web"] = now
            if len(marks) == 2 and "start_cpu_s" not in marks:
                roots = [p.pid for p in procs]
                marks["start_cpu_s"] = sum(cpu_of(tree(roots)).values())
            return len(marks) == 3

        wait_until(up, 90, "uvicorn up and the first send", interval=0.02)
        res = _idle_figures([p.pid for p in procs], idle, run.service_processes)
        res["first_task_ms"] = (marks["first"] - started) * 1000
        res["ready_ms"] = (max(marks["first"], marks["web"]) - started) * 1000
        res["start_cpu_s"] = marks["start_cpu_s"]
        return res
    finally:
        reap_quietly([ctl, *procs])
        run.close()


def _w5_rows(b: Bench, results: dict) -> None:
    pss = column(results, "pss_mb")
    ready = column(results, "ready_ms")
    peer_pss = _med(pss[PEER])
    b.report.add(
        Row(
            "W5",
            "idle PSS MB (tree)",
            pss,
            "{:.0f}",
            target="<= 1/2 peer",
            verdict=" ".join(
                _cmp(_med(pss[s]), peer_pss, lambda a, p: a <= p / 2)
                for s in b.cd_systems()
            ),
        )
    )
    b.report.add(Row("W5", "idle RSS MB (tree)", column(results, "rss_mb"), "{:.0f}"))
    b.report.add(
        Row("W5", "processes", column(results, "processes"), "{:.0f}", ratio=False)
    )
    idle = column(results, "idle_cpu_pct")
    b.report.add(
        Row(
            "W5",
            "idle CPU % of a core",
            idle,
            "{:.1f}",
            target="<= 1 %",
            verdict=" ".join(
                _cmp(_med(idle[s]), 1.0, lambda a, t: a <= t) for s in b.cd_systems()
            ),
            note="the whole tree's CPU over 30 s, after 20 s of settling",
        )
    )
    b.report.add(
        Row("W5", "start -> first task ms", column(results, "first_task_ms"), "{:.0f}")
    )
    b.report.add(
        Row(
            "W5",
            "start -> READY ms",
            ready,
            "{:.0f}",
            target="< 1.0 s",
            verdict=" ".join(
                _cmp(_med(ready[s]), 1000, lambda a, t: a < t) for s in b.cd_systems()
            ),
            note="campaignd: status socket says every role RUNNING; peer: "
            "uvicorn answers and the first task is done",
        )
    )
    b.report.add(
        Row(
            "W5",
            "CPU s until READY (tree)",
            column(results, "start_cpu_s"),
            "{:.2f}",
            note="the CPU the whole tree spent starting: on 2 cores READY "
            "cannot come sooner than about half of it",
        )
    )
    b.report.add(
        Row(
            "W5",
            "services PSS MB (Redis+PG)",
            column(results, "svc_pss_mb"),
            "{:.0f}",
            ratio=False,
            note="embedded mode needs no service; cluster and peer "
            "share one private redis-server and PostgreSQL",
        )
    )


WORKLOADS = {
    "w1": w1_dispatch,
    "w2": w2_ingest,
    "w3": w3_respawn,
    "w4": w4_chaos,
    "w5": w5_footprint,
    # A reply after 5 s idle -> Message 2 (bench/w6_idle_reply.py).
    "w6": lambda b: __import__("bench.w6_idle_reply").w6_idle_reply.workload(b),
    # A campaign of a million contacts (bench/scale.py); "all" skips it.
    "scale": lambda b: __import__("bench.scale").scale.workload(b),
}
