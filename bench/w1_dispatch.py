"""W1 dispatch: n Message 1 sends queued first, then the workers; and one
whole campaign with the workers up (the fan-out inside the span).
"""

from __future__ import annotations

import os
import time

import psutil

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
from bench.harness import TreeMeter
from bench.harness import reap_quietly
from bench.harness import wait_until
from bench.report import Row


def w1_dispatch(b: Bench) -> None:
    n = 1000 if b.quick else int(os.environ.get("CAMPAIGND_BENCH_W1_SENDS", 5000))
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
    # bench.w1_ab's fake runs in its parent process: no CPU figure then.
    spawned = getattr(fake, "spawned", None)
    fake_process = psutil.Process(spawned.proc.pid) if spawned else None
    fake_cpu_at_first = _cpu_s(fake_process) if fake_process else None
    machine = psutil.cpu_times()
    wait_until(lambda: fake.accepted() >= n, 30 + n / 50, "every send", interval=0.02)
    wait_until(lambda: sent_rows() >= n, 60, "rows marked sent", interval=0.02)
    meter.stop()
    fake_cpu_ms_msg = None
    if fake_process is not None:
        fake_cpu_ms_msg = (_cpu_s(fake_process) - fake_cpu_at_first) / n * 1000
    first, last = _accept_span(fake.messages())
    return {
        "msgs_s": (n - 1) / max(last - first, 1e-3),
        "cpu_ms_msg": meter.cpu_s / n * 1000,
        "svc_cpu_ms_msg": meter.extra_cpu_s / n * 1000,
        "fake_cpu_ms_msg": fake_cpu_ms_msg,
        "machine_busy_pct": _busy_pct(machine, psutil.cpu_times()),
        "peak_rss_mb": meter.peak_rss / MB,
    }


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _busy_pct(before, after) -> float:
    """Share of all the machine's cores busy between two psutil.cpu_times()."""
    total = sum(after) - sum(before)
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    return 100.0 * (total - idle) / total if total > 0 else 0.0


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
    peer_rate, peer_cpu = med(rate[PEER]), med(cpu[PEER])
    b.report.add(
        Row(
            "W1",
            "msgs/s",
            rate,
            "{:.0f}",
            target=">= 5x / 3x peer",
            verdict=" ".join(
                compare(med(rate[s]), peer_rate, lambda a, p, s=s: a >= W1_TIMES[s] * p)
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
                compare(med(cpu[s]), peer_cpu, lambda a, p: a < p)
                for s in b.cd_systems()
            ),
        )
    )
    b.report.add(
        Row("W1", "CPU ms/msg (Redis+PG)", column(results, "svc_cpu_ms_msg"), "{:.2f}")
    )
    b.report.add(
        Row(
            "W1",
            "CPU ms/msg (fake provider)",
            column(results, "fake_cpu_ms_msg"),
            "{:.2f}",
            note="the same fake serves every system, on the same 2 cores",
        )
    )
    b.report.add(
        Row(
            "W1",
            "machine CPU busy %",
            column(results, "machine_busy_pct"),
            "{:.0f}",
            note="all cores, from the first send to the last row marked sent: "
            "near 100 %, the run is bound by the machine's CPU",
        )
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
