"""`campaignd campaign show ID --watch` as the operator runs it, into a pipe.

The CLI watches a campaign while the test moves it along in the database
(as the workers would: Message 1 rows sent, members replying, then the
campaign completed). Not a terminal: one plain snapshot per interval, no
escape code, every line within 80 columns, until the campaign completes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.helpers import subprocess_env
from tests.helpers import wait_for
from tests.integration.test_cli_campaign import campaignd
from tests.integration.test_cli_campaign import create

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cfg(make_config):
    return make_config("sqlite", {"pacing": {"per_minute": 12.0, "daily_cap": 1000}})


@pytest.fixture
def campaign_id(cfg, tmp_path):
    csv_path = tmp_path / "contacts.csv"
    rows = "".join(f"06 12 34 56 7{i};C{i};Paris\n" for i in range(4))
    csv_path.write_text("phone;name;city\n" + rows)
    made = create(cfg, csv_path)
    assert made.returncode == 0, made.stderr
    campaign = int(re.search(r"campaign (\d+):", made.stdout).group(1))
    started = campaignd(cfg, "campaign", "start", str(campaign))
    assert started.returncode == 0, started.stderr
    return campaign


class Watcher:
    """The CLI in a process, its stdout read by a thread as it comes."""

    def __init__(self, cfg, *args: str):
        cmd = [sys.executable, "-m", "daemon", "campaign", "show", *args]
        self.proc = subprocess.Popen(
            [*cmd, "-c", cfg.source],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        self.chunks: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.chunks.append(line)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def snapshots(self) -> list[str]:
        # Each snapshot starts with its title line.
        return re.split(r"(?m)^(?=campaign \d+: )", self.text)[1:]

    def shows(self, needle: str) -> bool:
        assert self.proc.poll() in (None, 0), self.proc.stderr.read()
        return any(needle in s for s in self.snapshots())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def send_message1(campaign_id: int, count: int, status: str = "delivered") -> None:
    """What a worker records when `count` Message 1 went out."""
    now = utcnow()
    members = (
        CampaignContact.select()
        .where(
            CampaignContact.campaign == campaign_id,
            CampaignContact.state == "pending",
        )
        .order_by(CampaignContact.id)
        .limit(count)
    )
    with database.atomic():
        for member in members:
            Message.create(
                campaign=campaign_id,
                contact=member.contact_id,
                kind=1,
                phone="+33600000000",
                body="Bonjour",
                status=status,
                idempotency_key=f"watch-{member.id}",
                sent_at=now,
            )
            member.state = "message_1_sent"
            member.save()


def test_watch_draws_snapshots_until_the_campaign_completes(cfg, campaign_id):
    open_database(cfg)
    watcher = Watcher(cfg, str(campaign_id), "--watch", "--interval", "0.2")
    try:
        # Running, nothing sent: 4 Message 1 at 12 a minute take 20 s.
        wait_for(lambda: watcher.shows("4 Message 1 to send"), timeout=30)
        with database.connection_context():
            send_message1(campaign_id, 2)
        wait_for(lambda: watcher.shows("2 Message 1 to send"), timeout=30)
        with database.connection_context():
            send_message1(campaign_id, 2, status="read")
            CampaignContact.update(state="expired").where(
                CampaignContact.campaign == campaign_id
            ).execute()
            Campaign.update(status="completed", finished_at=utcnow()).where(
                Campaign.id == campaign_id
            ).execute()
        assert watcher.proc.wait(timeout=30) == 0, watcher.proc.stderr.read()
        watcher.reader.join(timeout=10)
    finally:
        watcher.close()

    text = watcher.text
    assert "\x1b" not in text  # not a terminal: no escape code
    assert max(len(line) for line in text.splitlines()) <= 80
    shots = watcher.snapshots()
    assert len(shots) >= 3
    first = next(s for s in shots if "4 Message 1 to send" in s)
    assert re.search(
        r"4 Message 1 to send, the last by \d\d:\d\d:\d\d UTC \(in (19|20)s\); "
        r"12/min, cap 1000/day",
        first,
    ), first
    assert re.search(r"^targeted +4 #{50} +100%$", first, re.M), first
    assert re.search(r"^Message 1 sent +0 \.{50} +0%$", first, re.M), first
    middle = next(s for s in shots if "2 Message 1 to send" in s)
    assert re.search(r"^Message 1 sent +2 #{25}\.{25} +50%$", middle, re.M), middle
    last = shots[-1]
    assert "status completed" in last
    assert re.search(r"^Message 1 sent +4 #{50} +100%$", last, re.M), last
    assert re.search(r"^read +2 #{25}\.{25} +50%$", last, re.M), last
    assert "expired (no reply) 4" in last
    assert re.search(
        r"^completed at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", last, re.M
    ), last


def test_watch_refuses_json_and_a_bad_interval(cfg, campaign_id):
    both = campaignd(cfg, "campaign", "show", str(campaign_id), "--watch", "--json")
    assert both.returncode == 1
    assert (
        both.stderr.strip() == "campaignd: error: --watch draws text: leave out --json"
    )
    bad = campaignd(
        cfg, "campaign", "show", str(campaign_id), "--watch", "--interval", "0"
    )
    assert bad.returncode != 0
    assert bad.stderr.splitlines()[-1] == (
        "campaignd: error: argument --interval: must be seconds between 0.05 "
        "and 3600, got '0'"
    )
    missing = campaignd(cfg, "campaign", "show", "999", "--watch")
    assert missing.returncode == 1
    assert len(missing.stderr.splitlines()) == 1, missing.stderr


def test_on_a_terminal_each_snapshot_replaces_the_last(cfg, campaign_id):
    """On a TTY: cursor home and clear before each drawing, then the same
    snapshot; the campaign completing ends it."""
    import os
    import pty

    open_database(cfg)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "campaign", "show", str(campaign_id)]
        + ["--watch", "--interval", "0.2", "-c", cfg.source],
        stdout=slave,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    os.close(slave)
    seen = bytearray()

    def drawn(times: int) -> bool:
        seen.extend(os.read(master, 65536))
        return seen.count(b"\x1b[H\x1b[J") >= times

    try:
        wait_for(lambda: drawn(2), timeout=30, what="two drawings")
        with database.connection_context():
            Campaign.update(status="cancelled", finished_at=utcnow()).where(
                Campaign.id == campaign_id
            ).execute()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        while chunk := os.read(master, 65536):
            seen.extend(chunk)
    except OSError:  # EIO: the other side is closed
        pass
    os.close(master)
    last = seen.decode().rsplit("\x1b[H\x1b[J", 1)[1]
    assert "status cancelled" in last
    assert "targeted              4 " in last
