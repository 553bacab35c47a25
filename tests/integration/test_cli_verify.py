"""`campaignd verify` against the fake provider (a real HTTP server on loopback)."""

from __future__ import annotations

import json
import subprocess

import pytest

from daemon.app.tasks import Tasks
from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.providers.fake import FakeOptions
from daemon.store.db import open_database
from daemon.store.models import NumberCheck
from daemon.store.queue import make_queues
from tests.helpers import free_port
from tests.helpers import run_cli

TOKEN = "verify-token"


def campaignd(cfg, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, cfg=cfg)


@pytest.fixture
def fake_options():
    return FakeOptions(token=TOKEN)


@pytest.fixture
def cfg(make_config, fake, tmp_path):
    cfg = make_config("sqlite", {"provider": {"base_url": fake.url, "token": TOKEN}})
    path = tmp_path / "contacts.csv"
    # The fake says numbers ending in 0000 are not on WhatsApp.
    path.write_text(
        "phone,name\n0612345678,Ann\n0612340000,Bob\n0781223344,Cid\n0698765432,Dan\n"
    )
    assert campaignd(cfg, "contacts", "import", str(path)).returncode == EXIT_OK
    return cfg


def _statuses(cfg) -> dict[str, str]:
    proc = campaignd(cfg, "contacts", "list", "--json")
    return {c["phone"]: c["wa_status"] for c in json.loads(proc.stdout)["contacts"]}


def test_verify_one_phone_now_and_store_the_answer(cfg, fake):
    proc = campaignd(cfg, "verify", "--phone", "06 12 34 56 78")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.strip() == "+33612345678 is on WhatsApp"

    proc = campaignd(cfg, "verify", "--phone", "+33612340000", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout) == {
        "phone": "+33612340000",
        "exists": False,
        "stored": True,
    }
    statuses = _statuses(cfg)
    assert statuses["+33612345678"] == "valid"
    assert statuses["+33612340000"] == "invalid"
    assert statuses["+33781223344"] == "unknown"

    stranger = campaignd(cfg, "verify", "--phone", "0611111111")
    assert stranger.returncode == EXIT_OK
    assert stranger.stdout.strip() == (
        "+33611111111 is on WhatsApp (not a known contact: nothing stored)"
    )
    assert fake.stats()["checks"] == 3


def test_provider_errors_are_one_line(cfg, make_config):
    wrong_token = make_config(
        "sqlite",
        {"provider": {"base_url": cfg.provider.base_url, "token": "wrong"}},
    )
    proc = campaignd(wrong_token, "verify", "--phone", "0612345678")
    assert proc.returncode == EXIT_FAILURE
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("campaignd: error: ")

    nobody = make_config(
        "sqlite", {"provider": {"base_url": f"http://127.0.0.1:{free_port()}"}}
    )
    proc = campaignd(nobody, "verify", "--phone", "0612345678")
    assert proc.returncode == EXIT_FAILURE
    assert len(proc.stderr.splitlines()) == 1
    assert "cannot connect" in proc.stderr

    bad = campaignd(cfg, "verify", "--phone", "12")
    assert bad.returncode == EXIT_FAILURE
    assert "invalid phone number '12'" in bad.stderr


def _queued_checks(cfg) -> list[int]:
    """The contact ids of the pending checks, each with its verify_whatsapp
    entry waiting in the queue (the entry carries the check's id)."""
    queues = make_queues(cfg)
    Tasks(cfg, queues)  # registers the task names, so the queue can decode them
    db = open_database(cfg)
    try:
        entries = []
        while (task := queues.verification.dequeue()) is not None:
            assert task.name.endswith("verify_whatsapp")
            entries.append(task.args[0])
        with db.connection_context():
            pending = {
                c.id: c.contact_id
                for c in NumberCheck.select().where(NumberCheck.status == "pending")
            }
        assert sorted(entries) == sorted(pending)
        return sorted(pending.values())
    finally:
        queues.close()
        db.close()


def test_verify_all_queues_only_numbers_never_checked(cfg):
    assert campaignd(cfg, "verify", "--phone", "0612345678").returncode == EXIT_OK
    assert campaignd(cfg, "contacts", "opt-out", "0781223344").returncode == EXIT_OK
    proc = campaignd(cfg, "verify", "--all")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.startswith("queued 2 numbers for verification (20 per minute")
    # Ann is checked, Cid opted out: Bob (id 2) and Dan (id 4) are left.
    assert _queued_checks(cfg) == [2, 4]


def test_verify_campaign_queues_its_members(cfg, tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("phone,name\n0698765432,Dan\n0612345678,Ann\n")
    created = campaignd(
        cfg,
        "campaign",
        "create",
        "--name",
        "c",
        "--message1",
        "Hi {name}",
        "--message2",
        "ok",
        "--contacts",
        str(path),
        "--json",
    )
    assert created.returncode == EXIT_OK, created.stderr
    campaign_id = json.loads(created.stdout)["id"]

    proc = campaignd(cfg, "verify", "--campaign", str(campaign_id), "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["queued"] == 2
    assert _queued_checks(cfg) == [1, 4]

    missing = campaignd(cfg, "verify", "--campaign", "99")
    assert missing.returncode == EXIT_FAILURE
    assert missing.stderr.strip() == "campaignd: error: campaign 99 does not exist"
