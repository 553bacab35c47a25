"""How long /metrics' row counts take on a big `message` table.

    .venv/bin/python tools/bench_metrics_rows.py [--rows 1000000] [--database-url URL]

Seeds a fresh database (a temporary SQLite file, or the PostgreSQL database
given, whose tables it replaces: use a scratch one) with that many Message
rows over 10 campaigns, 6 statuses and both kinds, then times the query the
web role runs at each scrape (daemon.roles.web.health.count_rows: messages
by status and kind, and the active alerts) and prints the median of 5 runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from daemon import config as config_mod
from daemon.roles.web.health import count_rows
from daemon.store.db import is_postgres
from daemon.store.db import open_database
from daemon.store.models import database

STATUSES = ("queued", "sent", "delivered", "read", "failed", "expired")


def _mod(a: str, b: int) -> str:
    # No `%` (a placeholder for psycopg) and no mod() (not in every SQLite).
    return f"({a} - ({a} / {b}) * {b})"


def seed(rows: int) -> None:
    """`rows` contacts, 10 campaigns and one message per contact, in SQL."""
    series = (
        f"SELECT generate_series(1, {rows}) AS n"
        if is_postgres()
        else f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s "
        f"WHERE n < {rows}) SELECT n FROM s"
    )
    statuses = " ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(STATUSES))
    with database.atomic():
        for i in range(10):
            database.execute_sql(
                "INSERT INTO campaign (name, message1, message2, status, "
                "status_reason, skip_invalid, created_at) VALUES "
                f"('c{i}', 'a', 'b', 'running', '', {database.param}, "
                "CURRENT_TIMESTAMP)",
                [True],
            )
        database.execute_sql(
            "INSERT INTO contact (id, phone, name, variables, wa_status, created_at) "
            f"SELECT n, '+3360' || n, '', '{{}}', 'unknown', CURRENT_TIMESTAMP "
            f"FROM ({series}) AS s"
        )
        database.execute_sql(
            "INSERT INTO message (campaign_id, contact_id, kind, phone, body, "
            "status, priority, attempts, failures, idempotency_key, created_at) "
            f"SELECT {_mod('n', 10)} + 1, n, CASE {_mod('n', 7)} WHEN 0 THEN 2 "
            f"ELSE 1 END, '+3360' || n, 'a', CASE {_mod('n', 6)} {statuses} END, "
            "0, 0, 0, 'k' || n, CURRENT_TIMESTAMP "
            f"FROM ({series}) AS s"
        )
    if is_postgres():
        database.execute_sql("VACUUM ANALYZE message")
    else:
        database.execute_sql("ANALYZE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    text = f'[daemon]\ndata_dir = "{workdir}"\n'
    if args.database_url:
        text += f'[database]\nurl = "{args.database_url}"\n'
    (workdir / "campaignd.toml").write_text(text)
    cfg = config_mod.load(workdir / "campaignd.toml")
    try:
        return run(cfg, args.rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(cfg, rows: int) -> int:
    db = open_database(cfg, migrate_schema=True)
    if is_postgres():
        tables = "message, campaign_contact, campaign, contact"
        db.execute_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    started = time.perf_counter()
    seed(rows)
    print(f"seeded {rows} messages in {time.perf_counter() - started:.1f} s")
    db.close()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        counted, _alerts = count_rows()
        times.append(time.perf_counter() - started)
    assert sum(n for _k, _s, n in counted) == rows
    backend = "postgresql" if is_postgres() else "sqlite"
    print(
        f"{backend}: messages by status and kind over {rows} rows: "
        f"median {statistics.median(times):.3f} s, max {max(times):.3f} s (5 runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
