"""W3 respawn: SIGKILL a worker, then the top process, under a restart loop;
campaignd against the Celery worker.
"""

from __future__ import annotations

import os
import random
import signal
import time

from bench import campaignd_side as cd
from bench import peer_side as peer
from bench.common import PEER
from bench.common import Bench
from bench.common import compare
from bench.common import med
from bench.harness import BenchError
from bench.harness import FakeProviderProcess
from bench.harness import Spawned
from bench.harness import tree
from bench.harness import wait_until
from bench.report import Row


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
        if b.peer:  # not with --no-peer
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
                # When the supervisor saw it, not when this 10 ms poll did.
                running_at.append(time.monotonic() - role["state_for_s"])
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
                compare(med(child.get(s, [])), 250, lambda a, t: a < t)
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
                compare(med(running.get(s, [])), 50, lambda a, t: a < t)
                for s in systems
                if s != PEER
            ),
            note="campaignd: the supervisor has seen the new child's first "
            "heartbeat (RUNNING; its time from the status socket's "
            "state_for_s, not from the 10 ms poll); peer: the new pool "
            "process exists",
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
                compare(med(top.get(s, [])), 1500, lambda a, t: a < t)
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
