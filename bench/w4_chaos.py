"""W4 chaos: SIGKILLs during a campaign against the non-deduping fake; what
was lost, what a phone got twice, and how unconfirmed sends settled.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable

from bench import campaignd_side as cd
from bench import peer_side as peer
from bench.common import FINAL_CD
from bench.common import FINAL_PEER
from bench.common import PEER
from bench.common import Bench
from bench.common import collect
from bench.common import column
from bench.common import compare
from bench.common import med
from bench.harness import BenchError
from bench.harness import FakeProviderProcess
from bench.harness import reap_quietly
from bench.harness import wait_until
from bench.report import Row


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
                compare(med(lost[s]), 0, lambda a, t: a == t)
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
                compare(med(dups[s]), 0, lambda a, t: a == t)
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
