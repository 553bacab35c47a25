"""W5 footprint: start -> READY, then the idle tree's PSS, RSS and CPU."""

from __future__ import annotations

import contextlib
import time

from bench import campaignd_side as cd
from bench import peer_side as peer
from bench.common import MB
from bench.common import PEER
from bench.common import Bench
from bench.common import collect
from bench.common import column
from bench.common import compare
from bench.common import med
from bench.harness import FakeProviderProcess
from bench.harness import Spawned
from bench.harness import cpu_of
from bench.harness import http_ok
from bench.harness import memory_of
from bench.harness import reap_quietly
from bench.harness import tree
from bench.harness import wait_until
from bench.report import Row

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
        # CPU times come in clock ticks (10 ms): a sum of them is not exact
        # in binary, and 0.30 s over 30 s came out as 1.0000000000000004 %,
        # judged over a 1 % target (2026-12-06-e.json). Rounded finer than
        # a tick (0.03 % of this window).
        "idle_cpu_pct": round(idle / window_s * 100, 3),
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
    peer_pss = med(pss[PEER])
    b.report.add(
        Row(
            "W5",
            "idle PSS MB (tree)",
            pss,
            "{:.0f}",
            target="<= 1/2 peer",
            verdict=" ".join(
                compare(med(pss[s]), peer_pss, lambda a, p: a <= p / 2)
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
                compare(med(idle[s]), 1.0, lambda a, t: a <= t) for s in b.cd_systems()
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
                compare(med(ready[s]), 1000, lambda a, t: a < t) for s in b.cd_systems()
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
