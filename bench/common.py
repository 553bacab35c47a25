"""What every side-by-side workload shares: the run's settings (`Bench`), the
alternating runs (`collect`) and the medians and verdicts of the table.

Systems: "peer" (the Celery + Redis + FastAPI + PostgreSQL replica),
"cd-embedded" (campaignd, SQLite + SqliteHuey) and "cd-cluster" (campaignd,
PostgreSQL + Redis); W2 adds "ceiling" (hello-world Falcon, same waitress).
Runs alternate (run r starts with system r mod n), so slow drift of a shared
machine spreads over all systems; the table shows medians.
"""

from __future__ import annotations

import collections
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from bench.harness import PrivateRedis
from bench.report import Report

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


def med(values: list):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def compare(ours, theirs, op: Callable[[float, float], bool]) -> str:
    if ours is None or theirs is None:
        return "n/a"
    return "ok" if op(ours, theirs) else "MISSED"
