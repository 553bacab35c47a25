"""W1 send path, this tree against another checkout, alternating, in one run.

    git worktree add /tmp/w1-before 8e8790e
    .venv/bin/python -m bench.w1_ab --other /tmp/w1-before [--rounds 3] [-n 5000]

Each round runs the other tree, then this one (each: embedded then cluster,
`_w1_cd` of that tree, in bench/w1_dispatch.py or, before the split, in
bench/workloads.py: n Message 1 sends queued first, the real `campaignd
worker` processes, msgs/s from the provider's first to last
acceptance). Only campaignd runs: the peer is not needed to compare two
versions of campaignd. Every run of both trees talks to one fake provider,
this tree's, started once: the comparison is of the daemon, not of the fake.
A tree's code is chosen with PYTHONPATH and cwd (its bench and its daemon;
the workers are this venv's `campaignd` script, which then imports that
tree's daemon: each child prints `daemon.__file__` to prove it). The other
tree needs `.venv` linked to this one (done here when missing).

Prints per run and the medians per tree and mode; exit 1 when this tree's
median msgs/s is more than 5 % below the other's in any mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

CHILD = r"""
import json, sys, tempfile, time, uuid
from pathlib import Path
import daemon
from bench import harness
try:
    from bench import common, w1_dispatch
except ImportError:  # a tree from before bench/workloads.py was split
    from bench import workloads as common, workloads as w1_dispatch
try:
    from bench.report import Report
except ImportError:  # a tree from before bench/harness.py was split
    from bench.harness import Report

url, n, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")

class Fake(harness.FakeProviderProcess):
    def __init__(self, url):
        self.url = url

def log(msg):
    print(f"    [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

harness.compile_bytecode()
fake = Fake(url)
base = Path(tempfile.mkdtemp(prefix="w1ab-"))
redis = harness.PrivateRedis(base / "logs")
try:
    b = common.Bench(base, uuid.uuid4().hex[:6], redis, False, 1, modes, log,
                        Report([]))
    out = {}
    for mode in modes:
        fake.reset()
        out[mode] = w1_dispatch._w1_cd(b, fake, mode, n)
finally:
    redis.close()
print(json.dumps({"daemon": daemon.__file__, "results": out}))
"""


def _run(tree: Path, fake_url: str, n: int, modes: str) -> dict:
    env = harness.bench_env(PYTHONPATH=str(tree))
    out = subprocess.run(
        [str(harness.MAIN_PYTHON), "-c", CHILD, fake_url, str(n), modes],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if out.returncode != 0:
        raise harness.BenchError(f"W1 in {tree} failed:\n{out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    want = str(tree / "daemon" / "__init__.py")
    if data["daemon"] != want:
        raise harness.BenchError(f"{tree}: imported {data['daemon']}, not {want}")
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.w1_ab", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--other", required=True, type=Path, help="the other checkout (git worktree)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=5000, help="sends per run")
    parser.add_argument("--modes", default="embedded,cluster")
    args = parser.parse_args(argv)
    other = args.other.resolve()
    if not (other / ".venv").exists():
        (other / ".venv").symlink_to(harness.ROOT / ".venv")
    trees = {"other": other, "this": harness.ROOT}
    modes = [m for m in args.modes.split(",") if m]
    print(
        f"python -m bench.w1_ab --other {other} --rounds {args.rounds} "
        f"-n {args.n} --modes {args.modes}"
    )
    print(f"machine: {harness.machine_summary()}")
    for name, tree in trees.items():
        head = subprocess.run(
            ["git", "-C", str(tree), "log", "--oneline", "-1"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"{name}: {tree} at {head[:60]}")
    log_dir = Path(tempfile.mkdtemp(prefix="w1ab-fake-"))
    fake = harness.FakeProviderProcess(log_dir)
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for name in ("other", "this"):
                started = time.monotonic()
                data = _run(trees[name], fake.url, args.n, args.modes)
                for mode, res in data["results"].items():
                    rates.setdefault((name, mode), []).append(res["msgs_s"])
                    cpu.setdefault((name, mode), []).append(res["cpu_ms_msg"])
                print(
                    f"  round {r + 1} {name:5} ({time.monotonic() - started:.0f}s, "
                    f"load {os.getloadavg()[0]:.1f}): "
                    + ", ".join(
                        f"{m} {res['msgs_s']:.0f} msgs/s {res['cpu_ms_msg']:.2f} "
                        f"CPU ms/msg"
                        for m, res in data["results"].items()
                    ),
                    flush=True,
                )
    finally:
        fake.close()
    worst = 0.0
    print()
    print(
        "| mode | other msgs/s (runs) | this msgs/s (runs) | this/other "
        "| CPU ms/msg other / this |"
    )
    print("|---|---|---|---|---|")
    for mode in modes:
        o, t = rates[("other", mode)], rates[("this", mode)]
        ratio = statistics.median(t) / statistics.median(o)
        worst = min(worst, ratio - 1)
        runs_o = ", ".join(f"{v:.0f}" for v in o)
        runs_t = ", ".join(f"{v:.0f}" for v in t)
        print(
            f"| {mode} | {statistics.median(o):.0f} ({runs_o})"
            f" | {statistics.median(t):.0f} ({runs_t})"
            f" | {ratio:.3f} | {statistics.median(cpu[('other', mode)]):.2f} / "
            f"{statistics.median(cpu[('this', mode)]):.2f} |"
        )
    print(f"finished; load average now {os.getloadavg()[0]:.1f}")
    return 1 if worst < -0.05 else 0


if __name__ == "__main__":
    sys.exit(main())
