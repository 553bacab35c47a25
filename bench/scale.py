"""Benchmark: a campaign of a million contacts, in each storage mode.

    .venv/bin/python -m bench.scale [--rows 1000000] [--modes embedded,cluster]
    .venv/bin/python -m bench scale          (the same, through the harness)

Steps, each timed with the peak RSS of every process it ran:

1. import: a generated CSV (';', a BOM, mixed number formats: E.164 compact
   and grouped, national compact and grouped, 00-prefixed; 1 % bad rows) with
   `contacts.import_csv_file` in a child process (its worker processes
   included);
2. campaign: one draft campaign over every contact with
   `campaigns.create_campaign` (as `campaign create --all-contacts`), in a
   child process whose peak RSS is reported;
3. fan-out: start it with the `messages` workers running (the default two
   processes) and the fake provider at 0 ms, until every member has its
   Message 1; sends go on meanwhile. The longest fan-out task is the longest
   gap between two batches' created_at within one chain (each link stamps
   its batch once; a big campaign fans out in tasks.FANOUT_CHAINS chains);
4. `campaign show`: the CLI's wall time, and what it computes alone
   (`campaign_summary` plus `campaign_report.with_sending`).

Embedded: SQLite + SqliteHuey in a temp dir. Cluster: a new PostgreSQL
database (CAMPAIGND_BENCH_PG, default the local server) and Redis at
CAMPAIGND_BENCH_REDIS (default redis://127.0.0.1:6379/0) with a prefix of its
own, both removed at the end. Targets: import < 60 s, fan-out < 60 s, no task
over 10 s, every process < 300 MB, campaign show < 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from bench.harness import CAMPAIGND
from bench.harness import MAIN_PYTHON
from bench.harness import ROOT
from bench.harness import FakeProviderProcess
from bench.harness import bench_env
from bench.harness import create_database
from bench.harness import drop_database
from bench.harness import spawn

MB = 2**20
REDIS_URL = os.environ.get("CAMPAIGND_BENCH_REDIS", "redis://127.0.0.1:6379/0")
TARGETS = {
    "import_s": 60.0,
    "fanout_s": 60.0,
    "longest_task_s": 10.0,
    "peak_rss_mb": 300.0,
    "show_ms": 200.0,
}
CITIES = ("Paris", "Lyon", "Marseille", "Lille", "Nantes", "Saint-Étienne")


def write_csv(path: Path, rows: int) -> int:
    """`rows` data rows, 1 % bad; how many are bad."""
    bad = 0
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        f.write("phone;name;city;order\r\n")
        for i in range(rows):
            kind = i % 100
            if kind == 99:
                phone = f"12{i % 1000:03d}"  # too short
                bad += 1
            else:
                n = f"{(610_000_000 if i % 2 else 780_000_000) + i:09d}"
                phone = (
                    f"+33{n}",
                    "0" + n[0] + " " + " ".join(n[j : j + 2] for j in range(1, 9, 2)),
                    f"0{n}",
                    f"+33 {n[0]} {n[1:3]} {n[3:5]} {n[5:7]} {n[7:9]}",
                    f"0033{n}",
                )[kind % 5]
            name = f'"{("Dupont", "Martin", "Durand")[i % 3]}; {i}"'
            f.write(f"{phone};{name};{CITIES[i % len(CITIES)]};{i}\r\n")
    return bad


class PeakRss:
    """Polls a process tree; the largest RSS any one process reached, and the
    CPU time each used (as last seen: a poll every 0.2 s, so a process's
    last fraction of a second may be missed).

    `server_tag`: also the CPU time of the PostgreSQL backends whose command
    line names it (the bench's database).
    """

    def __init__(self, pids, server_tag: str | None = None):
        self.pids = pids
        self.root_pid: int | None = None
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self.server_tag = server_tag
        self.server_cpu: dict[int, float] = {}

    def sample(self) -> None:
        for pid in self.pids():
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    self.peak = max(self.peak, proc.memory_info().rss)
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        if self.server_tag:
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    line = " ".join(proc.info["cmdline"] or ())
                    if proc.info["name"] == "postgres" and self.server_tag in line:
                        times = proc.cpu_times()
                        self.server_cpu[proc.pid] = times.user + times.system
                except psutil.Error:
                    pass

    def cpu_summary(self) -> str:
        main = self.cpu.get(self.root_pid, 0.0) if self.root_pid else 0.0
        others = sum(self.cpu.values()) - main
        text = f"CPU s: main process {main:.1f}, its children {others:.1f}"
        if self.server_tag:
            text += f", PostgreSQL {sum(self.server_cpu.values()):.1f}"
        return text


def _child(code: str, config: Path, meter: PeakRss | None = None) -> tuple[float, str]:
    """Run `code` in a fresh python with the database open; (seconds, stdout)."""
    prelude = (
        "import sys, json, time\n"
        "from daemon import config as C\n"
        "from daemon.store.db import open_database\n"
        f"cfg = C.load({str(config)!r})\n"
        "open_database(cfg, migrate_schema=True)\n"
    )
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(MAIN_PYTHON), "-c", prelude + code],
        cwd=ROOT,
        env=bench_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    if meter is not None:
        meter.pids = lambda: [proc.pid]
        meter.root_pid = proc.pid
    while proc.poll() is None:
        if meter is not None:
            meter.sample()
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {code[:80]}")
    return time.perf_counter() - started, out


IMPORT = """
from daemon.domain.contacts import import_csv_file
parsed, result = import_csv_file(sys.argv[1] if len(sys.argv) > 1 else {csv!r}, "FR")
print(json.dumps({{"created": result.created, "rejected": len(parsed.errors)}}))
"""
CAMPAIGN = """
from daemon.domain import campaigns
# What `campaign create --all-contacts` runs: every contact, in chunks, each
# one checked for {city} and written by one INSERT ... SELECT.
c = campaigns.create_campaign("scale", "Bonjour {name} de {city}",
                              "Merci {name} !", None)
print(c.id)
"""
SUMMARY = """
from daemon.domain import campaigns
from daemon import campaign_report
# What `campaign show` computes: the summary plus the sending details.
campaign_report.with_sending(cfg, campaigns.campaign_summary({cid}))
t = time.perf_counter()
campaign_report.with_sending(cfg, campaigns.campaign_summary({cid}))
print((time.perf_counter() - t) * 1000)
from daemon.store.models import database
from daemon.app.tasks import FANOUT_CHAINS
from daemon.domain.campaigns import fanout
# Each fan-out link stamps its batch with one created_at: the longest gap
# between two batches of one chain bounds the longest link (Huey's own log
# is off). Chains split the member id span as campaigns.fanout_ranges does.
low, high = database.execute_sql(
    "SELECT MIN(id), MAX(id) FROM campaign_contact WHERE campaign_id = "
    + str({cid})).fetchone()
span = high - low + 1
chains = max(1, min(FANOUT_CHAINS, span // (
    cfg.campaigns.fanout_batch * fanout._MIN_CHAIN_BATCHES)))
step = -(-span // chains)
rows = database.execute_sql(
    "SELECT DISTINCT m.created_at, (cc.id - " + str(low) + ") / " + str(step)
    + " FROM message AS m JOIN campaign_contact AS cc ON cc.campaign_id ="
    " m.campaign_id AND cc.contact_id = m.contact_id WHERE m.campaign_id = "
    + str({cid}) + " AND m.kind = 1").fetchall()
import datetime as dt
by_chain = {{}}
for stamp, chain in rows:
    if isinstance(stamp, str):
        stamp = dt.datetime.fromisoformat(stamp)
    by_chain.setdefault(chain, set()).add(stamp)
gaps = []
for stamps in by_chain.values():
    stamps = sorted(stamps)
    gaps += [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
print(max(gaps, default=0.0), sum(len(v) for v in by_chain.values()))
"""


def run_mode(
    mode: str,
    rows: int,
    csv_path: Path,
    base: Path,
    log,
    keep: bool = False,
    fanout_batch: int | None = None,
) -> dict:
    tag = uuid.uuid4().hex[:8]
    workdir = base / f"{mode}-{tag}"
    workdir.mkdir()
    fake = FakeProviderProcess(workdir / "logs")
    lines = [
        f'[daemon]\ndata_dir = "{workdir / "data"}"\nlog_level = "info"',
        f'[provider]\nbase_url = "{fake.url}"\ntoken = "bench-token"',
        "[pacing]\nper_minute = 0.0\ndaily_cap = 0",
    ]
    if fanout_batch:
        lines.append(f"[campaigns]\nfanout_batch = {fanout_batch}")
    pg_name = None
    if mode == "cluster":
        pg_name = f"cdscale_{tag}"
        lines.append(f'[database]\nurl = "{create_database(pg_name)}"')
        lines.append(
            f'[queue]\nbackend = "redis"\nurl = "{REDIS_URL}"\n'
            f'name_prefix = "cdscale{tag}"'
        )
    config = workdir / "campaignd.toml"
    config.write_text("\n\n".join(lines) + "\n")
    res: dict = {"mode": mode, "rows": rows}
    workers = []
    try:
        meter = PeakRss(lambda: [], f" {pg_name} " if pg_name else None)
        # The import is the step most moved by other load on the machine (it
        # needs every core): the 1-minute load average before and after it.
        load_before = os.getloadavg()[0]
        took, out = _child(IMPORT.format(csv=str(csv_path)), config, meter)
        res.update(import_s=took, import_rss_mb=meter.peak / MB, **json.loads(out))
        log(
            f"  {mode} import: {took:.1f}s, {res['created']} created, "
            f"{res['rejected']} rejected, peak {meter.peak / MB:.0f} MB, "
            f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
            + meter.cpu_summary()
        )
        meter = PeakRss(lambda: [])
        took, out = _child(CAMPAIGN, config, meter)
        cid = int(out.strip())
        res["campaign_s"] = took
        res["campaign_rss_mb"] = meter.peak / MB
        log(f"  {mode} campaign: {took:.1f}s, peak {meter.peak / MB:.0f} MB")
        workers = [
            spawn(
                "worker",
                [str(CAMPAIGND), "worker", "--queue", "messages", "-c", str(config)],
                workdir / "logs",
            )
            for _ in range(2)
        ]
        wmeter = PeakRss(lambda: [w.proc.pid for w in workers])
        time.sleep(3)  # the workers' start-up is not the fan-out
        started = time.perf_counter()
        _child(
            f"from daemon.domain import campaigns\n"
            f"from daemon.store.queue import make_queues\n"
            f"from daemon.app.tasks import Tasks\n"
            f"campaigns.start_campaign({cid}, Tasks(cfg, make_queues(cfg)))\n",
            config,
        )
        count_code = (
            "from daemon.store.models import Message, CampaignContact\n"
            "import peewee as pw\n"
            f"goal = CampaignContact.select().where(CampaignContact.campaign == {cid})"
            ".count()\n"
            "deadline = time.monotonic() + 1800\n"
            "while time.monotonic() < deadline:\n"
            f"    n = Message.select().where(Message.campaign == {cid}, "
            "Message.kind == 1).count()\n"
            "    print(n, goal, flush=True)\n"
            "    if n >= goal: break\n"
            "    time.sleep(1)\n"
        )
        poller = subprocess.Popen(
            [
                str(MAIN_PYTHON),
                "-c",
                (
                    "import sys, json, time\nfrom daemon import config as C\n"
                    "from daemon.store.db import open_database\n"
                    f"cfg = C.load({str(config)!r})\nopen_database(cfg)\n" + count_code
                ),
            ],
            cwd=ROOT,
            env=bench_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        while poller.poll() is None:
            wmeter.sample()
            time.sleep(0.2)
        res["fanout_s"] = time.perf_counter() - started
        res["fanout_rss_mb"] = wmeter.peak / MB
        for w in workers:
            w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.proc.wait(30)
        log(
            f"  {mode} fan-out: {res['fanout_s']:.1f}s, workers' peak "
            f"{res['fanout_rss_mb']:.0f} MB"
        )
        started = time.perf_counter()
        show = [str(CAMPAIGND), "campaign", "show", str(cid), "-c", str(config)]
        subprocess.run(show, cwd=ROOT, env=bench_env(), capture_output=True, check=True)
        res["show_cli_ms"] = (time.perf_counter() - started) * 1000
        _, out = _child(SUMMARY.format(cid=cid), config)
        show_ms, gap = out.strip().splitlines()
        res["show_ms"] = float(show_ms)
        res["longest_task_s"], res["tasks_logged"] = (float(x) for x in gap.split())
        res["peak_rss_mb"] = max(
            res["import_rss_mb"], res["campaign_rss_mb"], res["fanout_rss_mb"]
        )
        log(
            f"  {mode} campaign show: CLI {res['show_cli_ms']:.0f} ms, "
            f"report {res['show_ms']:.0f} ms; longest fan-out link "
            f"{res['longest_task_s']:.2f}s of {res['tasks_logged']:.0f}"
        )
        return res
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        fake.close()
        if keep:
            log(f"  kept {workdir} {pg_name or ''} (Redis prefix cdscale{tag})")
        elif pg_name:
            drop_database(pg_name)
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(f"*cdscale{tag}*"))
            if keys:
                client.delete(*keys)


def render(results: list[dict]) -> str:
    cols = [
        ("import_s", "import s", "{:.1f}"),
        ("import_rss_mb", "import MB", "{:.0f}"),
        ("campaign_s", "campaign s", "{:.1f}"),
        ("campaign_rss_mb", "campaign MB", "{:.0f}"),
        ("fanout_s", "fan-out s", "{:.1f}"),
        ("longest_task_s", "longest task s", "{:.2f}"),
        ("fanout_rss_mb", "workers MB", "{:.0f}"),
        ("show_ms", "show ms", "{:.0f}"),
        ("show_cli_ms", "show CLI ms", "{:.0f}"),
    ]
    head = "| mode | rows | " + " | ".join(c[1] for c in cols) + " | verdict |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in results:
        cells = [
            fmt.format(r[k]) if r.get(k) is not None else "n/a" for k, _, fmt in cols
        ]
        missed = [
            k for k, limit in TARGETS.items() if r.get(k) is None or r[k] >= limit
        ]
        verdict = "ok" if not missed else "MISSED " + ", ".join(missed)
        lines.append(
            f"| {r['mode']} | {r['rows']} | " + " | ".join(cells) + f" | {verdict} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--modes", default="embedded,cluster")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the data dirs and the PostgreSQL database",
    )
    parser.add_argument(
        "--fanout-batch",
        type=int,
        default=None,
        help="campaigns.fanout_batch (default: the daemon's)",
    )
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="cdscale-"))

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    try:
        csv_path = base / "contacts.csv"
        bad = write_csv(csv_path, args.rows)
        log(f"{args.rows} rows ({csv_path.stat().st_size / 1e6:.0f} MB), {bad} bad")
        results = [
            run_mode(
                m.strip(), args.rows, csv_path, base, log, args.keep, args.fanout_batch
            )
            for m in args.modes.split(",")
            if m.strip()
        ]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    batch = f" --fanout-batch {args.fanout_batch}" if args.fanout_batch else ""
    print(f"python -m bench.scale --rows {args.rows} --modes {args.modes}{batch}")
    print(render(results))
    return 0 if "MISSED" not in render(results) else 1


def workload(b) -> None:
    """`python -m bench scale`: the same run, its table in the log.

    Not part of `python -m bench all` (minutes, and ~1 GB of disk at a
    million): `all` runs every entry of WORKLOADS, so this one returns unless
    it was asked for by name.
    """
    if "scale" not in sys.argv[1:]:
        b.log("scale: skipped (run it by name: python -m bench scale)")
        return
    rows = 100_000 if b.quick else 1_000_000
    code = main(["--rows", str(rows), "--modes", ",".join(b.modes)])
    if code:
        b.failures.append("scale: a target was missed (see the table above)")


if __name__ == "__main__":
    sys.exit(main())
