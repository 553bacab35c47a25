"""A respawned worker's start-up, step by step, in fresh forks of a zygote.

W3's "kill worker -> replacement up" is mostly the new worker:background
building itself in a process just forked from the zygote, where every first
touch of a page, of a cache, of a connection is paid again. This imports what
the zygote imports (cli.ZYGOTE_IMPORTS, as zygote.import_roles does), freezes
the heap as it does, then forks --forks times; each child runs worker.main's
steps for the background queues and times them: wall ms, CPU ms and minor
page faults of each step, then the same steps once more in the same child
(warm), so that the difference is the price of a fresh fork. The child's
consumer is started (its threads connect to the queue) and stopped.

    .venv/bin/python bench/respawn_steps.py [--mode cluster|embedded] [--forks 9]
        [--profile STEP]

cluster: PostgreSQL (CAMPAIGND_BENCH_PG, a fresh database dropped afterwards)
and a private redis-server; embedded: SQLite in a temporary directory. Metrics
are kept in files (PROMETHEUS_MULTIPROC_DIR), as under `campaignd run`.
--profile STEP prints the cProfile of that step in the first fork.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# As under `campaignd run`: metrics in files, which prometheus_client decides
# when it is imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="respawn-metrics-")

from bench import harness  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.cli import ZYGOTE_IMPORTS  # noqa: E402
from daemon.supervision.zygote import import_roles  # noqa: E402

STEPS = ("open_database", "make_queues", "Tasks", "build_consumers", "start")


def _usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt


def run_steps(cfg, profile: str | None) -> dict[str, tuple[float, float, int]]:
    """worker.main's steps, as it runs them: step -> (wall ms, CPU ms, faults)."""
    from daemon.app.tasks import Tasks
    from daemon.roles import worker
    from daemon.store.db import open_database
    from daemon.store.queue import make_queues

    state: dict = {}
    actions = {
        "open_database": lambda: open_database(cfg, migrate_schema=False),
        "make_queues": lambda: state.update(queues=make_queues(cfg)),
        "Tasks": lambda: state.update(tasks=Tasks(cfg, state["queues"])),
        "build_consumers": lambda: state.update(
            consumer=worker.build_consumers(
                cfg, worker.BACKGROUND_QUEUES, state["tasks"], None
            )
        ),
        "start": lambda: state["consumer"].start(),
    }
    out = {}
    for step in STEPS:
        profiler = None
        if step == profile:
            profiler = cProfile.Profile()
            profiler.enable()
        cpu0, faults0 = _usage()
        t0 = time.perf_counter()
        actions[step]()
        wall = time.perf_counter() - t0
        cpu1, faults1 = _usage()
        if profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(25)
            stats.print_callers("_compile")
        out[step] = (wall * 1000, (cpu1 - cpu0) * 1000, faults1 - faults0)
    consumer = state["consumer"]
    consumer.shutdown_timeout = 2
    consumer.stop(graceful=True)
    return out


def migrate(cfg) -> None:
    """The schema, made in a child: the zygote opens no database."""
    pid = os.fork()
    if pid == 0:
        from daemon.store.db import open_database

        try:
            open_database(cfg, migrate_schema=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def one_fork(cfg, profile: str | None) -> dict:
    """Fork; the child times the steps cold, then warm, and reports."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            gc.enable()
            cold = run_steps(cfg, profile)
            warm = run_steps(cfg, None)
            os.write(write_end, json.dumps({"cold": cold, "warm": warm}).encode())
        except BaseException:  # noqa: BLE001 - the parent reports it
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise harness.BenchError(f"fork {pid} failed (status {status})")
    return json.loads(data)


def report(results: list[dict]) -> None:
    print(
        f"{'step':16} {'cold wall':>10} {'cold CPU':>9} {'faults':>7}"
        f" {'warm wall':>10} {'warm CPU':>9}   (ms, medians of {len(results)} forks)"
    )
    totals = {"cold": [0.0] * len(results), "warm": [0.0] * len(results)}
    for step in STEPS:
        cells = []
        for when in ("cold", "warm"):
            walls = [r[when][step][0] for r in results]
            for i, wall in enumerate(walls):
                totals[when][i] += wall
            cells.append(statistics.median(walls))
            cells.append(statistics.median(r[when][step][1] for r in results))
            if when == "cold":
                cells.append(statistics.median(r[when][step][2] for r in results))
        print(
            f"{step:16} {cells[0]:10.2f} {cells[1]:9.2f} {cells[2]:7.0f}"
            f" {cells[3]:10.2f} {cells[4]:9.2f}"
        )
    print(
        f"{'all steps':16} {statistics.median(totals['cold']):10.2f}"
        f" {'':9} {'':7} {statistics.median(totals['warm']):10.2f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cluster", "embedded"), default="cluster")
    parser.add_argument("--forks", type=int, default=9)
    parser.add_argument("--profile", choices=STEPS)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="respawn-steps-"))
    raw: dict = {"daemon": {"data_dir": str(scratch / "data")}}
    redis = dbname = None
    try:
        if args.mode == "cluster":
            missing = harness.pg_available()
            if missing is not None:
                raise harness.BenchError(f"PostgreSQL is not available: {missing}")
            dbname = f"respawn_steps_{os.getpid()}"
            redis = harness.PrivateRedis(scratch)
            raw["database"] = {"url": harness.create_database(dbname)}
            raw["queue"] = {"backend": "redis", "url": redis.url_db(0)}
            # The harness's ping filled redis-py's version cache here; the
            # zygote makes no connection, so its children start without it.
            from redis.utils import get_lib_version

            get_lib_version.cache_clear()
        cfg = config_mod.from_dict(raw, env={})
        migrate(cfg)
        # As zygote.serve does: no collection while importing, then freeze.
        gc.disable()
        import_roles(cfg, ZYGOTE_IMPORTS)
        gc.freeze()
        results = [
            one_fork(cfg, args.profile if i == 0 else None) for i in range(args.forks)
        ]
        report(results)
        return 0
    finally:
        if redis is not None:
            redis.close()
        if dbname is not None:
            harness.drop_database(dbname)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
