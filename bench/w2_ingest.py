"""W2 webhook ingest: wrk (or bench/loadgen.py) against `campaignd web`, the
peer's FastAPI endpoint and the hello-world ceiling.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import time

from bench import campaignd_side as cd
from bench import peer_side as peer
from bench.common import PEER
from bench.common import Bench
from bench.common import collect
from bench.common import column
from bench.common import compare
from bench.common import med
from bench.harness import MAIN_PYTHON
from bench.harness import ROOT
from bench.harness import BenchError
from bench.harness import Spawned
from bench.harness import TreeMeter
from bench.harness import free_port
from bench.harness import http_ok
from bench.harness import reap_quietly
from bench.harness import spawn
from bench.harness import wait_until
from bench.report import Row


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
    (bench/webhook_load.py's script: unique 1.5 KB bodies), else bench.loadgen."""
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
        from bench.webhook_load import run_wrk
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
    ceiling = med(rps["ceiling"])
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
                compare(med(share[s]), 70, lambda a, t: a >= t) for s in b.cd_systems()
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
                compare(med(p99[s]), 50, lambda a, t: a < t) for s in b.cd_systems()
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
