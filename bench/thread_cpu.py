"""A server's CPU by thread, for bench/webhook_ingest.py --by-thread.

Linux keeps every thread's user and system time (/proc/PID/task/TID/stat) but
not Python's thread names, so the server reads its own: on SIGUSR2 it appends
one JSON line, CPU seconds by group of threads (below), to a file named after
its pid in the directory the bench gives it ($CAMPAIGND_BENCH_THREAD_CPU_DIR).
The bench takes that snapshot before and after its load and divides the
difference by the requests answered.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

ENV = "CAMPAIGND_BENCH_THREAD_CPU_DIR"

# Python thread name (or its prefix before "-": waitress numbers its
# threads) -> what the table calls it.
GROUPS = {
    "MainThread": "main loop",
    "waitress": "request threads",
    "event-writer": "event writer",
    "event-enqueuer": "event enqueuer",
    "floor-writer": "floor writer",
}


def group_of(name: str) -> str:
    return GROUPS.get(name) or GROUPS.get(name.split("-")[0], "other")


def install() -> None:
    """Server side: answer SIGUSR2 with a snapshot (when the bench asked)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    path = Path(directory) / f"{os.getpid()}.jsonl"
    ticks = os.sysconf("SC_CLK_TCK")

    def snapshot(*_) -> None:
        seconds: dict[str, list[float]] = {}
        for thread in threading.enumerate():
            try:
                stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            except OSError:
                continue  # ended meanwhile
            fields = stat.rsplit(")", 1)[1].split()
            user, system = int(fields[11]) / ticks, int(fields[12]) / ticks
            total = seconds.setdefault(group_of(thread.name), [0.0, 0.0])
            total[0] += user
            total[1] += system
        with path.open("a") as out:
            out.write(json.dumps(seconds) + "\n")

    signal.signal(signal.SIGUSR2, snapshot)


def snapshot(pid: int, directory: Path, timeout: float = 10.0) -> dict:
    """Bench side: the server's CPU seconds by group, now."""
    path = directory / f"{pid}.jsonl"
    seen = len(path.read_text().splitlines()) if path.exists() else 0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) > seen:
            return json.loads(lines[seen])
        time.sleep(0.01)
    raise TimeoutError(f"no thread CPU snapshot from pid {pid}")


def per_request(before: dict, after: dict, requests: int) -> dict[str, list[float]]:
    """Microseconds a request by group: [user, system]."""
    spent = {}
    for group, (user, system) in after.items():
        user_before, system_before = before.get(group, (0.0, 0.0))
        spent[group] = [
            (user - user_before) / requests * 1e6,
            (system - system_before) / requests * 1e6,
        ]
    return spent


def print_table(rows: list[tuple[str, dict]]) -> None:
    """The CPU a request of each (name, result) by group of threads."""
    groups = [g for g in GROUPS.values() if any(g in r["threads"] for _, r in rows)]
    groups += ["other"] if any("other" in r["threads"] for _, r in rows) else []
    print("\nCPU us/req by thread (user + system; system in brackets)")
    print(f"{'server':<50}" + "".join(f"{g:>22}" for g in groups))
    for name, r in rows:
        cells = []
        for group in groups:
            user, system = r["threads"].get(group, (0.0, 0.0))
            cells.append(
                f"{user + system:>14.0f} ({system:>4.0f})"
                if user + system
                else f"{'-':>22}"
            )
        print(f"{name:<50}" + "".join(cells))
