"""The event writer's store alone: one group's INSERT and commit, no server.

Calls EventWriter._store (what the writer thread does with a group) on a
fresh SQLite database, with nothing else running, for groups of --rows
unique 1.5 KB Wassenger events, once per PRAGMA synchronous level, and
prints the wall and CPU time of a group. Next to bench/webhook_ingest.py's
"ms a commit" under load, the difference is the writer thread waiting for
its turn (the GIL, the cores), not SQLite.

    .venv/bin/python bench/webhook_store_alone.py [--rows 8] [--groups 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.webhook_load import sample_body  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.roles.web.event_writer import EventWriter  # noqa: E402
from daemon.store.db import open_database  # noqa: E402
from daemon.store.models import database  # noqa: E402
from daemon.store.models import utcnow  # noqa: E402


class NoQueue:
    def __init__(self, cfg):
        self.cfg = cfg


def groups_of(rows: int, count: int, tag: str) -> list[list[dict]]:
    return [
        [
            {
                "provider": "wassenger",
                "dedupe_key": f"message:in:new:{tag}{g}-{r}:",
                "event_type": "message:in:new",
                "payload": sample_body(f"{tag}{g}-{r}"),
                "received_at": utcnow(),
                "attempts": 0,
            }
            for r in range(rows)
        ]
        for g in range(count)
    ]


def measure(level: str, rows: int, count: int) -> tuple[float, float]:
    """Wall and CPU ms a group, on a database of its own."""
    cfg = config_mod.from_dict({"daemon": {"data_dir": tempfile.mkdtemp()}})
    open_database(cfg, migrate_schema=True)
    writer = EventWriter(NoQueue(cfg))
    writer.sqlite_synchronous = level
    writer._store(groups_of(rows, 1, "warm")[0])  # opens the connection
    groups = groups_of(rows, count, level)
    wall = cpu = 0.0
    for group in groups:
        started, used = time.perf_counter(), time.thread_time()
        writer._store(group)
        wall += time.perf_counter() - started
        cpu += time.thread_time() - used
    database.close()
    return wall / count * 1e3, cpu / count * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="events a group")
    parser.add_argument("--groups", type=int, default=500)
    args = parser.parse_args()
    print(f"EventWriter._store alone, SQLite (WAL), groups of {args.rows} events")
    for level in ("full", "normal"):
        wall, cpu = measure(level, args.rows, args.groups)
        print(f"synchronous={level:<7} wall {wall:.3f} ms a group, CPU {cpu:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
