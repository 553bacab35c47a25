"""What Prometheus scrapes from a running daemon, and the contrib files over it.

`campaignd run` with every role and the fake provider (which posts delivery
statuses and replies back to our webhook) runs a small campaign to its end;
one role is SIGKILLed and comes back. Then GET /metrics must show each role
as the supervisor reports it, the message rows as the database holds them,
the daemon's alerts and the leader; and every campaignd_* name that
contrib/prometheus/rules.yml and contrib/grafana/campaignd.json use must be
in that scrape. `promtool check rules` runs too when promtool is on PATH
(Debian's `prometheus` package); the check is skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import peewee as pw
import pytest
import requests
import yaml

from daemon import __version__
from daemon import config as config_mod
from daemon.app.tasks import Tasks
from daemon.domain import alerts
from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.roles import leader
from daemon.status_client import request as status_request
from daemon.store.db import open_database
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.helpers import dump_toml
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "rules.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "campaignd.json"
SECRET = "monitoring-secret"
CONTACTS = 30
ROLES = (
    "web",
    "worker:background",
    "worker:messages#1",
    "worker:messages#2",
    "scheduler",
)
# A metric name in PromQL: an identifier followed by `{`, `[`, whitespace,
# `)` or the end (label names inside braces never start with campaignd_).
METRIC_NAME = re.compile(r"\b(campaignd_[a-zA-Z0-9_:]+)(?=[{\[\s)]|$)")


class Daemon:
    """`campaignd run` in a short temp dir, with the fake provider."""

    def __init__(self, workdir: Path, fake: FakeProvider, web_port: int):
        self.workdir = workdir
        data = {
            "daemon": {"data_dir": str(workdir / "data"), "log_level": "warning"},
            "provider": {"base_url": fake.url},
            "web": {"port": web_port, "webhook_secret": SECRET},
            "pacing": {"per_minute": 0.0, "daily_cap": 0},
            "campaigns": {"reply_window_h": 4 / 3600},
            "retry": {"base_s": 1.0, "cap_s": 5.0},
            "scheduler": {"check_expired_interactions_s": 1.0, "sweep_s": 2.0},
            "supervisor": {"heartbeat_interval_s": 0.5},
        }
        path = workdir / "campaignd.toml"
        path.write_text(dump_toml(data))
        self.cfg = config_mod.load(path)
        self.url = f"http://127.0.0.1:{web_port}"
        self.log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def status(self) -> dict:
        try:
            return status_request(self.cfg.status_socket, {"cmd": "status"})
        except (OSError, ValueError):
            return {}

    def all_running(self) -> dict | None:
        assert self.proc.poll() is None, self.tail()
        answer = self.status()
        roles = answer.get("roles") or []
        return answer if roles and all(r["state"] == "RUNNING" for r in roles) else None

    def tail(self) -> str:
        self.log.flush()
        return (self.workdir / "daemon.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def daemon():
    # Short: the status socket's path must fit in 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="cmon-"))
    web_port = free_port()
    options = FakeOptions(
        latency_ms=10.0,
        webhook_url=f"http://127.0.0.1:{web_port}/webhooks/wassenger",
        webhook_secret=SECRET,
        reply_share=0.4,
        opt_out_share=0.1,
        reply_delay_ms=300.0,
        invalid_suffix="0000",
    )
    with FakeProvider(options) as fake:
        built = Daemon(workdir, fake, web_port)
        try:
            wait_for(built.all_running, timeout=60, interval=0.2, what="all RUNNING")
            open_database(built.cfg)
            yield built
        finally:
            database.close()
            built.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def run_campaign(d: Daemon) -> int:
    """A campaign of CONTACTS (every 10th number fails), started and completed."""
    with database.connection_context():
        ids = [
            Contact.create(phone=f"+3361{i:07d}" if i % 10 else f"+3362{i:03d}0000").id
            for i in range(1, CONTACTS + 1)
        ]
        campaign = campaigns.create_campaign("Monitoring", "Bonjour", "Merci", ids)
        queues = make_queues(d.cfg)
        try:
            campaigns.start_campaign(campaign.id, Tasks(d.cfg, queues))
        finally:
            queues.close()

    def completed():
        with database.connection_context():
            return campaigns.get_campaign(campaign.id).status == "completed"

    wait_for(completed, timeout=90, interval=0.5, what="the campaign completed")
    return campaign.id


def message_counts() -> dict[tuple[int, str], int]:
    with database.connection_context():
        query = Message.select(
            Message.kind, Message.status, pw.fn.COUNT(pw.SQL("*"))
        ).group_by(Message.kind, Message.status)
        return {(kind, status): n for kind, status, n in query.tuples()}


def scrape(d: Daemon) -> str:
    answer = requests.get(f"{d.url}/metrics", timeout=10)
    assert answer.status_code == 200
    return answer.text


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every campaignd_ sample."""
    found = {}
    for line in text.splitlines():
        if line.startswith("campaignd_"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def exported_names(text: str) -> set[str]:
    """Every series name the scrape defines (a histogram's _bucket, _sum and
    _count included, whether or not it has samples yet)."""
    names = set()
    for line in text.splitlines():
        match = re.match(r"(?:# TYPE )?(campaignd_\w+)(?: (\w+))?", line)
        if not match:
            continue
        name, kind = match.groups()
        names.add(name)
        if line.startswith("# TYPE") and kind == "histogram":
            names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        exprs.append(variable["definition"])
    return exprs


def test_a_running_daemon_exports_what_the_rules_and_dashboard_read(daemon):
    d = daemon
    campaign_id = run_campaign(d)
    # One role dies and is started again: its restart count shows.
    before = d.all_running()
    killed = "worker:background"
    old_pid = next(r["pid"] for r in before["roles"] if r["name"] == killed)
    os.kill(old_pid, signal.SIGKILL)

    def back_and_measured():
        # The supervisor measures a new process at its next check: until
        # then its RSS is unknown, and absent from /metrics.
        answer = d.all_running()
        roles = {r["name"]: r for r in (answer or {}).get("roles", [])}
        return (
            roles
            and roles[killed]["pid"] != old_pid
            and all(r["rss_mb"] is not None for r in roles.values())
            and all(r["heartbeat_age_s"] is not None for r in roles.values())
        )

    wait_for(back_and_measured, timeout=30, what=f"{killed} back and measured")
    alerts.record_raised("test:monitoring", "raised by the test", severity="warning")
    holder = wait_for(
        lambda: leader.current_holder(d.cfg), timeout=30, what="a scheduler leader"
    )
    # Late status webhooks may still move a row: scrape once the rows
    # stopped changing (the web role counts them at most every 30 s).
    seen: list[dict] = []

    def settled_rows():
        seen.append(message_counts())
        return len(seen) > 1 and seen[-1] == seen[-2] and seen[-1]

    rows = wait_for(settled_rows, timeout=30, interval=0.5, what="rows settled")
    assert sum(rows.values()) > CONTACTS  # Message 1s and some Message 2s

    text = scrape(d)
    got = samples(text)

    assert got["campaignd_supervisor_up"] == 1
    assert got[f'campaignd_build_info{{version="{__version__}"}}'] == 1
    for role in ROLES:
        assert got[f'campaignd_role_up{{role="{role}"}}'] == 1, role
        restarts = got[f'campaignd_role_restarts_total{{role="{role}"}}']
        assert restarts == (1 if role == killed else 0), (role, restarts)
        assert got[f'campaignd_role_rss_bytes{{role="{role}"}}'] > 10_000_000, role
        assert 0 <= got[f'campaignd_role_heartbeat_age_seconds{{role="{role}"}}'] < 30
    for (kind, status), n in rows.items():
        assert got[f'campaignd_messages{{kind="{kind}",status="{status}"}}'] == n
    assert got['campaignd_alert_active{key="test:monitoring",severity="warning"}'] == 1
    assert got["campaignd_alerts_active"] >= 1
    assert got[f'campaignd_leader_info{{owner="{holder}"}}'] == 1
    assert got["campaignd_webhook_events_dead"] == 0
    assert got["campaignd_messages_unconfirmed"] == 0
    assert got['campaignd_sends_total{kind="1",outcome="sent"}'] >= CONTACTS * 0.8
    assert got['campaignd_status_updates_total{status="delivered"}'] > 0
    assert campaign_id

    # Every name the shipped rules and dashboard use is in that scrape.
    exported = exported_names(text)
    for source, exprs in (
        (RULES.name, rule_expressions()),
        (DASHBOARD.name, dashboard_expressions()),
    ):
        used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
        assert used, source
        assert used <= exported, (source, sorted(used - exported))


def test_the_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_the_dashboard_is_grafana_json_with_the_panels_operators_expect():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for title in (
        "Roles up",
        "Restarts (15 min)",
        "Memory (RSS)",
        "Heartbeat age",
        "Queue depth",
        "Sends by outcome (per minute)",
        "Messages by status",
        "Unconfirmed sends",
        "Dead letters",
        "Active alerts",
    ):
        assert title in titles, title
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
