"""Service faults against the real daemon, embedded (SQLite): it bends,
reports, and loses nothing.

One timeline, run once per module by a fixture that records what it observes,
then judged by the tests below (so one slow daemon run serves many small
verdicts): the provider down for a while (every call 503), then the disk full
(the data dir is a small tmpfs, filled up).

During each fault: the supervisor and its roles stay up (no FATAL exit),
/readyz says what is missing, `campaignd status` shows it, a webhook that
cannot be stored gets a 503 (the provider retries), alerts fire. After it:
the campaign completes with nothing lost or sent twice.

Also here: prometheus files on a full disk (no SIGBUS), and a reply received
in time but processed after the window closed. The cluster timeline (Redis
and PostgreSQL down) is in test_faults_cluster.py; the helpers both use are
in tests/fault_helpers.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon import testing as ch
from daemon.providers.fake import FakeProvider
from tests.fault_helpers import CONTACTS
from tests.fault_helpers import SETTLE_S
from tests.fault_helpers import brief
from tests.fault_helpers import fake_options
from tests.fault_helpers import hold_outage
from tests.fault_helpers import observe
from tests.fault_helpers import settle
from tests.fault_helpers import tables_for
from tests.helpers import require
from tests.process.fixture_roles import AlertReceiver

pytestmark = [pytest.mark.slow]


# ------------------------------------------------------------------ embedded


def role_state(daemon, name: str) -> str | None:
    roles = (daemon.status() or {}).get("roles") or []
    return next((r["state"] for r in roles if r["name"] == name), None)


def role_restarts(daemon, name: str) -> int:
    roles = (daemon.status() or {}).get("roles") or []
    return next((r["restarts"] for r in roles if r["name"] == name), -1)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


def _fill(path: Path) -> Path:
    """Fill the file system holding `path` until ENOSPC; the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)
    return filler


METRICS_ON_A_FULL_DISK = """
import os, sys
from daemon import metrics
metrics.HTTP_SECONDS.labels("/first", "2xx").observe(0.01)  # files exist
fd = os.open(os.path.join(sys.argv[1], "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"\\0" * 4096)
except OSError:
    os.close(fd)
for i in range(5000):  # far more than the first 64 KiB of each file holds
    metrics.HTTP_SECONDS.labels(f"/route/{i}", "2xx").observe(0.01)
    metrics.INTERACTIONS.labels(f"outcome-{i}").inc()
print("alive", flush=True)
"""


def test_metrics_files_on_a_full_disk_are_no_sigbus(tmp_path):
    """Values that no longer fit their prometheus file (the disk is full)
    cost their place in /metrics, not the process (a SIGBUS before)."""
    where = tmp_path / "metrics"
    where.mkdir()
    require(_mount_tmpfs(where, "512k"), "cannot mount a tmpfs here (needs root)")
    try:
        done = subprocess.run(
            [sys.executable, "-c", METRICS_ON_A_FULL_DISK, str(where)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ch.ROOT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(where)},
        )
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert done.stdout.strip() == "alive"
        assert "new values are kept in memory" in done.stderr
        # What is in the directory still adds up: a scrape works.
        scrape = subprocess.run(
            [
                sys.executable,
                "-c",
                "from daemon import metrics; print(metrics.render().decode())",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ch.ROOT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(where)},
        )
        assert scrape.returncode == 0, scrape.stderr[-2000:]
        assert "campaignd_http_request_seconds" in scrape.stdout
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _truncate_wals(data: Path) -> None:
    import sqlite3

    for name in ("campaignd.db", "queue.db"):
        if (data / name).exists():
            with contextlib.closing(sqlite3.connect(data / name, timeout=10)) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


@pytest.fixture(scope="module")
def embedded_run():
    work = Path(tempfile.mkdtemp(prefix="faults-emb-", dir="/tmp"))
    data = work / "data"
    data.mkdir()
    tmpfs = _mount_tmpfs(data, "24m")
    facts: dict = {"tmpfs": tmpfs}
    daemon = None
    try:
        web_port = ch.free_port()
        options = fake_options(web_port)
        with AlertReceiver() as alerts, FakeProvider(options) as fake:
            cfg = ch.write_config(
                work, tables_for(work, fake.url, web_port, alerts.url)
            )
            daemon = ch.DaemonUnderTest(cfg, work).start()
            daemon.wait_ready(90)

            # 1. The provider answers 503 to everything for a while.
            fake.configure(down=True)
            campaign_id = ch.seed_campaign(cfg, ch.contact_phones(CONTACTS, 0))
            ch.wait_until(
                lambda: fake.stats()["failures_503"] >= CONTACTS,
                30,
                0.1,
                "sends refused by the provider",
            )
            # The health check runs every 2 s and raises on its first
            # failure; the deadline is generous for a loaded CI machine (it
            # is only reached when the alert never comes).
            with contextlib.suppress(AssertionError):
                alerts.wait_for("health:provider", "raised", timeout=60)
            facts["provider_down"] = observe(daemon, cfg, web_port, "provider")
            facts["provider_down_log"] = daemon.log_text()[-4000:]
            facts["provider_alert_sent"] = [
                a for a in alerts.received if "provider" in a["key"]
            ]
            fake.configure(down=False)
            facts["provider_settled"] = settle(campaign_id, fake, SETTLE_S)
            facts["provider_audit"] = ch.audit(campaign_id, fake, options)
            with contextlib.suppress(AssertionError):
                alerts.wait_for("health:provider", "resolved", timeout=15)
            facts["provider_resolved_sent"] = [
                a
                for a in alerts.received
                if "provider" in a["key"] and a["status"] == "resolved"
            ]

            # 2. The disk holding the data dir is full.
            if tmpfs:
                second = ch.contact_phones(CONTACTS * 2, 0)[CONTACTS:]
                campaign2 = ch.seed_campaign(cfg, second)
                # Full once the Message 1s are out: their acks and the
                # replies (posted 2 s later) hit the full disk.
                ch.wait_until(
                    lambda: fake.stats()["sends_accepted"] >= 2 * CONTACTS,
                    30,
                    0.05,
                    "second campaign sent",
                )
                web_restarts = role_restarts(daemon, "web")
                refused = fake.stats()["webhooks_retried"]
                started = time.monotonic()
                # An emptied WAL, so that the next commit needs new blocks: a
                # WAL that already has room takes writes on a full disk.
                _truncate_wals(data)
                filler = _fill(data)
                facts["disk_full"] = observe(daemon, cfg, web_port, "disk")
                hold_outage(
                    lambda: fake.stats()["webhooks_retried"] >= refused + 3,
                    "webhooks refused while the disk is full",
                    started,
                )
                facts["disk_full_later"] = observe(daemon, cfg, web_port, "disk2")
                facts["web_restarts_disk_full"] = (
                    role_restarts(daemon, "web") - web_restarts
                )
                filler.unlink()
                ch.wait_until(
                    lambda: role_state(daemon, "web") == "RUNNING",
                    60,
                    0.1,
                    "web running again",
                )
                facts["disk_back"] = observe(daemon, cfg, web_port, "diskback")
                facts["disk_settled"] = settle(campaign2, fake, SETTLE_S)
                facts["disk_audit"] = ch.audit(campaign2, fake, options)
            facts["exit_code"] = daemon.stop()
            facts["exits"] = list(daemon.exits)
            facts["log"] = daemon.log_text()
    finally:
        if daemon is not None:
            daemon.close()
        if tmpfs:
            subprocess.run(["umount", "-l", str(data)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return facts


@pytest.mark.timeout(240)
def test_provider_down_keeps_the_daemon_up_and_alerts(embedded_run):
    seen = embedded_run["provider_down"]
    assert seen["supervisor_alive"] and seen["supervisor_starts"] == 1
    assert set(seen["roles"].values()) == {"RUNNING"}, seen["roles"]
    # The provider is not a readiness dependency: webhooks still flow.
    assert seen["readyz"] == 200
    assert seen["webhook"] == 200
    assert "health:provider" in seen["alerts"], embedded_run["provider_down_log"]
    assert seen["status_rc"] == 1 and "health:provider" in seen["status_text"]
    assert embedded_run["provider_alert_sent"], "no alert reached alerts.webhook_url"


@pytest.mark.timeout(240)
def test_provider_back_completes_the_campaign_without_loss(embedded_run):
    assert embedded_run["provider_settled"]
    audit = embedded_run["provider_audit"]
    assert audit.message1_accepted == CONTACTS
    assert audit.lost == 0 and audit.duplicate_deliveries == 0, audit
    assert audit.message2_missing == 0 and audit.message2_extra == 0, audit
    assert audit.unprocessed_events == 0
    assert embedded_run["provider_resolved_sent"], "no recovery notice sent"


def _needs_tmpfs(run):
    # CI runs as root and may mount: fail there rather than skip.
    require(run["tmpfs"], "cannot mount a tmpfs here (needs root)")


@pytest.mark.timeout(240)
def test_disk_full_keeps_the_daemon_up(embedded_run):
    _needs_tmpfs(embedded_run)
    for phase in ("disk_full", "disk_full_later"):
        seen = embedded_run[phase]
        assert seen["supervisor_alive"] and seen["supervisor_starts"] == 1, phase
        assert "FATAL" not in seen["roles"].values(), brief(seen)
    assert embedded_run["disk_back"]["webhook"] == 200


@pytest.mark.timeout(240)
def test_disk_full_refuses_webhooks_with_503(embedded_run):
    _needs_tmpfs(embedded_run)
    for phase in ("disk_full", "disk_full_later"):
        seen = embedded_run[phase]
        # Not stored, so not acknowledged: the provider will retry.
        assert seen["webhook"] == 503, (phase, brief(seen))
    assert embedded_run["web_restarts_disk_full"] == 0


@pytest.mark.timeout(240)
def test_disk_full_makes_readyz_fail(embedded_run):
    _needs_tmpfs(embedded_run)
    assert embedded_run["disk_full_later"]["readyz"] == 503


@pytest.mark.timeout(240)
def test_disk_back_completes_the_campaign_without_loss(embedded_run):
    _needs_tmpfs(embedded_run)
    assert embedded_run["disk_settled"]
    audit = embedded_run["disk_audit"]
    assert audit.lost == 0 and audit.duplicate_deliveries == 0, audit
    assert audit.message2_missing == 0 and audit.message2_extra == 0, audit
    assert audit.unprocessed_events == 0


@pytest.mark.timeout(240)
def test_embedded_faults_end_with_a_clean_stop(embedded_run):
    assert embedded_run["exits"] == []  # the supervisor never died
    assert embedded_run["exit_code"] == 0
    assert "-> FATAL" not in embedded_run["log"]


# ------------------------------------------------------------ reply vs expiry


def _late_reply(make_config, *, others: int) -> int:
    """A reply stored 30 s before the window closes, processed 60 s after it,
    the expiry job having run in between (worker:default down or backlogged).

    `others`: contacts of the same campaign still waiting for Message 1, which
    keep the campaign running. Returns the number of Message 2 rows created.
    """
    from daemon.app.tasks import Tasks
    from daemon.domain import campaigns
    from daemon.store.db import open_database
    from daemon.store.models import Contact
    from daemon.store.models import InboundEvent
    from daemon.store.models import Message
    from daemon.store.models import database
    from daemon.store.models import utcnow
    from daemon.store.queue import make_queues

    window_h = 1.0
    cfg = make_config("sqlite", {"campaigns": {"reply_window_h": window_h}})
    open_database(cfg, migrate_schema=True)
    queues = make_queues(cfg)
    try:
        sent_at = utcnow()
        contacts = [
            Contact.create(phone=f"+3361234{i:04d}", name="A")
            for i in range(1 + others)
        ]
        campaign = campaigns.create_campaign(
            "late", "Bonjour", "Merci", [c.id for c in contacts]
        )
        tasks = Tasks(cfg, queues)
        campaigns.start_campaign(campaign.id, tasks)
        first = Message.get_by_id(sorted(campaigns.fan_out(campaign.id))[0])
        claimed = campaigns.claim(first.id, "test:1", 60, now=sent_at)
        campaigns.record_sent(claimed, "test:1", "p1", "w1", now=sent_at)
        window = dt.timedelta(hours=window_h)
        reply = {
            "event": "message:in:new",
            "id": "late-1",
            "data": {"id": "late-1", "fromNumber": first.phone, "body": "oui"},
        }
        event = InboundEvent.create(
            provider="wassenger",
            dedupe_key="late-1",
            event_type="message:in:new",
            payload=json.dumps(reply),
            received_at=sent_at + window - dt.timedelta(seconds=30),
        )
        if others:  # still waiting for their Message 1: the campaign runs on
            Message.update(next_attempt_at=sent_at + 2 * window).where(
                Message.id != first.id
            ).execute()
        campaigns.expire_interactions(
            window_h, now=sent_at + window + dt.timedelta(seconds=5)
        )
        tasks.clock = lambda: sent_at + window + dt.timedelta(seconds=60)
        tasks.process_event(event.id)
        return Message.select().where(Message.kind == 2).count()
    finally:
        queues.close()
        database.close()


def test_a_reply_received_in_time_is_honoured_even_if_processed_late(make_config):
    assert _late_reply(make_config, others=1) == 1


def test_a_late_processed_reply_of_the_last_open_member_gets_message_2(make_config):
    assert _late_reply(make_config, others=0) == 1
