"""A server's CPU by thread, and its garbage collections, for
bench/webhook_ingest.py --by-thread.

Linux keeps every thread's user and system time (/proc/PID/task/TID/stat) but
not Python's thread names, so the server reads its own: on SIGUSR2 it appends
one JSON line, CPU seconds by group of threads (below), to a file named after
its pid in the directory the bench gives it ($CAMPAIGND_BENCH_THREAD_CPU_DIR).
The bench takes that snapshot before and after its load and divides the
difference by the requests answered.

The same line holds the collector's pauses (gc.callbacks: collections, their
time in all, the longest since the previous snapshot, by generation): a
collection holds the GIL, so every request in flight waits for it.
"""

from __future__ import annotations

import gc
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
    # generation -> [collections, seconds in all, longest since the snapshot]
    pauses = {str(generation): [0, 0.0, 0.0] for generation in range(3)}
    started = [0.0]

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        tally = pauses[str(info["generation"])]
        tally[0] += 1
        tally[1] += took
        tally[2] = max(tally[2], took)

    gc.callbacks.append(on_collection)

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
        line = {"cpu": seconds, "gc": {g: list(t) for g, t in pauses.items()}}
        for tally in pauses.values():
            tally[2] = 0.0
        with path.open("a") as out:
            out.write(json.dumps(line) + "\n")

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
    for group, (user, system) in after["cpu"].items():
        user_before, system_before = before["cpu"].get(group, (0.0, 0.0))
        spent[group] = [
            (user - user_before) / requests * 1e6,
            (system - system_before) / requests * 1e6,
        ]
    return spent


def collections(before: dict, after: dict) -> dict[str, list[float]]:
    """The collections between two snapshots, by generation: [how many, ms
    in all, longest ms]."""
    found = {}
    for generation, (count, seconds, longest) in after["gc"].items():
        count_before, seconds_before, _ = before["gc"][generation]
        found[generation] = [
            count - count_before,
            (seconds - seconds_before) * 1e3,
            longest * 1e3,
        ]
    return found


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
    print("\ngarbage collections during the load: how many, ms in all, the longest")
    print(f"{'server':<50}" + "".join(f"{'gen ' + g:>22}" for g in "012"))
    for name, r in rows:
        cells = []
        for generation in "012":
            count, total_ms, longest_ms = r["gc"][generation]
            text = f"{count:.0f}, {total_ms:.1f}, {longest_ms:.1f}" if count else "-"
            cells.append(f"{text:>22}")
        print(f"{name:<50}" + "".join(cells))
