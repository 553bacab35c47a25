"""Side-by-side benchmarks: campaignd against a replica of the original stack.

    .venv/bin/python -m bench all|w1|w2|w3|w4|w5|w6 [--runs N] [--quick]

W1 dispatch, W2 webhook ingest, W3 respawn, W4 loss/duplication under
SIGKILL, W5 footprint, W6 reply after idleness (docs/benchmarks.md describes
each). campaignd runs in embedded mode (SQLite + SqliteHuey) and cluster mode
(PostgreSQL + Redis);
the peer is Celery + Redis + FastAPI/uvicorn + PostgreSQL, installed on first
use into bench/.venv-peer (bench/requirements-peer.txt). Needs the local
PostgreSQL (CAMPAIGND_BENCH_PG, default postgresql://postgres@127.0.0.1:5432/
postgres) and the redis-server binary (a private instance is started).
Exit code 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import common
from bench import harness
from bench import workloads
from bench.report import Report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "which", choices=["all", *workloads.WORKLOADS], help="workload(s) to run"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per system (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller workloads, one run: under 2 minutes",
    )
    parser.add_argument(
        "--modes",
        default="embedded,cluster",
        help="campaignd modes (embedded, cluster)",
    )
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="campaignd only (no Celery replica, no ratios)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work dir (configs, logs)"
    )
    return parser


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in ("embedded", "cluster")]:
        print(f"python -m bench: unknown mode {bad[0]!r}", file=sys.stderr)
        return 2
    if why := harness.pg_available():
        print(
            f"python -m bench: PostgreSQL not reachable ({why}); the peer and "
            "cluster mode need it (set CAMPAIGND_BENCH_PG)",
            file=sys.stderr,
        )
        return 2
    runs = args.runs or (1 if args.quick else 3)
    if not args.no_peer:
        harness.ensure_peer_venv(_log)
    harness.compile_bytecode()
    base = Path(tempfile.mkdtemp(prefix="cdbench-"))
    redis = harness.PrivateRedis(base / "logs")
    peers = [] if args.no_peer else ["ceiling", common.PEER]
    systems = peers + [f"cd-{m}" for m in modes]
    report = Report(systems)
    bench = common.Bench(
        base,
        uuid.uuid4().hex[:6],
        redis,
        args.quick,
        runs,
        modes,
        _log,
        report,
        peer=not args.no_peer,
    )
    which = list(workloads.WORKLOADS) if args.which == "all" else [args.which]
    started = time.monotonic()
    header = _header(args, runs)
    _log(header)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        _log(
            "WARNING: the machine is busy (load average above the CPU count); "
            "absolute figures will be low and noisy, ratios less so"
        )
    try:
        for name in which:
            workloads.WORKLOADS[name](bench)
    finally:
        redis.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    took = time.monotonic() - started
    print(header)
    print(f"finished in {took:.0f}s; load average now {_load()}")
    print(report.render())
    for failure in bench.failures:
        print(f"  failed run: {failure}")
    if args.keep:
        print(f"work dir kept: {base}")
    if args.json:
        data = report.to_json() | {
            "header": header,
            "seconds": took,
            "failures": bench.failures,
        }
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    missed = any("MISSED" in r.verdict for r in report.rows)
    return 1 if missed or bench.failures else 0


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _header(args, runs: int) -> str:
    peer = {} if args.no_peer else harness.peer_versions()
    ours = harness.main_versions()
    return (
        f"python -m bench {args.which}{' --quick' if args.quick else ''}"
        f"{' --no-peer' if args.no_peer else ''} (runs={runs}, modes={args.modes})\n"
        f"machine: {harness.machine_summary()}\n"
        "campaignd: " + ", ".join(f"{k} {v}" for k, v in ours.items()) + "\n"
        "peer: " + (", ".join(f"{k} {v}" for k, v in peer.items()) or "not run")
    )


if __name__ == "__main__":
    sys.exit(main())
