"""`campaignd campaign ...` as the operator runs it: a process, daemon down."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest

from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.store.queue import make_queues
from tests.helpers import run_cli

M1 = "Bonjour {name}, une question sur {city} ?"
M2 = "Merci {name} ! Voici le lien."


def campaignd(cfg, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, cfg=cfg)


def ok_json(cfg, *args: str):
    proc = campaignd(cfg, *args, "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    return json.loads(proc.stdout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == EXIT_FAILURE, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def contacts_csv(tmp_path):
    path = tmp_path / "contacts.csv"
    path.write_text(
        "phone;name;city\n06 12 34 56 78;Ann;Paris\n07 81 22 33 44;Bob;Lyon\n"
    )
    return path


def create(cfg, csv_path, *extra: str) -> subprocess.CompletedProcess:
    return campaignd(
        cfg,
        "campaign",
        "create",
        "--name",
        "Spring",
        "--message1",
        M1,
        "--message2",
        M2,
        "--contacts",
        str(csv_path),
        *extra,
    )


def test_create_imports_the_csv_and_makes_a_draft(make_config, contacts_csv):
    cfg = make_config("sqlite")
    proc = create(cfg, contacts_csv)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.splitlines()[0] == "campaign 1: Spring"
    assert "  status      draft" in proc.stdout
    assert "  imported    2 new contacts, 0 updated, 0 duplicates merged" in proc.stdout
    assert proc.stdout.rstrip().endswith("start it with: campaignd campaign start 1")

    summary = ok_json(cfg, "campaign", "show", "1")
    assert summary["status"] == "draft"
    assert summary["contacts"] == 2
    assert summary["members"] == {"pending": 2}
    assert summary["message1"] == M1

    listed = ok_json(cfg, "campaign", "list")
    assert [(c["id"], c["name"], c["contacts"]) for c in listed] == [(1, "Spring", 2)]
    table = campaignd(cfg, "campaign", "list")
    assert table.stdout.splitlines()[0].split()[:4] == [
        "ID",
        "NAME",
        "STATUS",
        "CONTACTS",
    ]


def test_template_variable_missing_creates_and_imports_nothing(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = tmp_path / "contacts.csv"
    path.write_text("phone,name,city\n0612345678,Ann,Paris\n0781223344,Bob,\n")
    error = one_error_line(create(cfg, path))
    assert error == (
        "campaignd: error: template variable {city} is missing for contact +33781223344"
    )
    assert ok_json(cfg, "campaign", "list") == []
    assert ok_json(cfg, "contacts", "list")["total"] == 0


def test_strict_rejected_rows_create_and_import_nothing(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = tmp_path / "contacts.csv"
    path.write_text("phone,name,city\n0612345678,Ann,Paris\n12,Bob,Lyon\n")
    proc = create(cfg, path, "--strict")
    assert proc.stdout.splitlines() == ["line 3: invalid phone number '12': too short"]
    assert one_error_line(proc) == (
        f"campaignd: error: {path}: 1 row rejected (listed above); strict: one "
        "bad row refuses the file, nothing was imported or created"
    )
    assert ok_json(cfg, "campaign", "list") == []
    assert ok_json(cfg, "contacts", "list")["total"] == 0


def test_rejected_rows_are_reported_and_the_good_ones_make_the_campaign(
    make_config, tmp_path
):
    cfg = make_config("sqlite")
    path = tmp_path / "contacts.csv"
    path.write_text("phone,name,city\n0612345678,Ann,Paris\n12,Bob,Lyon\n")
    proc = create(cfg, path)
    assert (
        "  imported    1 new contact, 0 updated, 0 duplicates merged, 1 row rejected"
        in proc.stdout.splitlines()
    )
    assert "line 3: invalid phone number '12': too short" in proc.stdout.splitlines()
    assert one_error_line(proc) == (
        "campaignd: error: 1 row rejected (listed above); campaign 1 was created "
        "with the 1 valid contact"
    )
    summary = ok_json(cfg, "campaign", "show", "1")
    assert (summary["contacts"], summary["members"]) == (1, {"pending": 1})
    assert ok_json(cfg, "contacts", "list")["total"] == 1


def test_template_variables_no_column_provides_are_all_named(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = tmp_path / "contacts.csv"
    path.write_text("tel;Nom;town\n0612345678;Ann;Paris\n")
    proc = campaignd(
        cfg,
        "campaign",
        "create",
        "--name",
        "x",
        "--message1",
        "Hi {name} from {city}",
        "--message2",
        "See you in {zip}, {town}",
        "--contacts",
        str(path),
    )
    assert one_error_line(proc) == (
        f"campaignd: error: {path}: template variables {{city}}, {{zip}} are not "
        "columns of the contacts (columns: tel ({phone}), Nom ({name}), town)"
    )
    assert ok_json(cfg, "campaign", "list") == []
    assert ok_json(cfg, "contacts", "list")["total"] == 0


def test_malformed_template_is_refused(make_config, contacts_csv):
    cfg = make_config("sqlite")
    proc = campaignd(
        cfg,
        "campaign",
        "create",
        "--name",
        "x",
        "--message1",
        "Hi {first name}",
        "--message2",
        "ok",
        "--contacts",
        str(contacts_csv),
    )
    assert "invalid template variable {first name}" in one_error_line(proc)


def test_contacts_source_is_required_once(make_config, contacts_csv):
    cfg = make_config("sqlite")
    base = ["campaign", "create", "--name", "x", "--message1", "a", "--message2", "b"]
    neither = campaignd(cfg, *base)
    both = campaignd(cfg, *base, "--all-contacts", "--contacts", str(contacts_csv))
    for proc in (neither, both):
        assert one_error_line(proc) == (
            "campaignd: error: give either --contacts FILE.csv or --all-contacts"
        )
    empty = campaignd(cfg, *base, "--all-contacts")
    assert (
        one_error_line(empty) == "campaignd: error: no contacts yet: import some first"
    )


def test_all_contacts_targets_everyone_and_keeps_opted_out_out(
    make_config, contacts_csv
):
    cfg = make_config("sqlite")
    assert campaignd(cfg, "contacts", "import", str(contacts_csv)).returncode == 0
    assert campaignd(cfg, "contacts", "opt-out", "0612345678").returncode == 0
    summary = ok_json(
        cfg,
        "campaign",
        "create",
        "--name",
        "All",
        "--message1",
        M1,
        "--message2",
        M2,
        "--all-contacts",
    )
    assert summary["contacts"] == 2
    assert summary["members"] == {"opted_out": 1, "pending": 1}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_lifecycle_start_pause_resume_cancel(any_mode_config, contacts_csv):
    cfg = any_mode_config
    assert create(cfg, contacts_csv).returncode == EXIT_OK
    queues = make_queues(cfg)
    try:
        assert sum(queues.depths().values()) == 0

        started = ok_json(cfg, "campaign", "start", "1")
        assert started["status"] == "running"
        assert started["started_at"]
        # The fan-out waits in the queue for the daemon's workers.
        assert queues.depths()["messages"] == 1

        again = campaignd(cfg, "campaign", "start", "1")
        assert one_error_line(again) == (
            "campaignd: error: cannot start campaign 1: it is running"
        )

        paused = ok_json(cfg, "campaign", "pause", "1")
        assert (paused["status"], paused["status_reason"]) == (
            "paused",
            "paused by the operator",
        )
        text = campaignd(cfg, "campaign", "show", "1")
        assert "  status      paused (paused by the operator)" in text.stdout

        assert ok_json(cfg, "campaign", "resume", "1")["status"] == "running"
        assert queues.depths()["messages"] == 2

        retried = ok_json(cfg, "campaign", "retry-failed", "1")
        assert retried["retried"] == 0

        cancelled = ok_json(cfg, "campaign", "cancel", "1")
        assert cancelled["status"] == "cancelled"
        assert cancelled["finished_at"]
        assert "cannot resume campaign 1: it is cancelled" in one_error_line(
            campaignd(cfg, "campaign", "resume", "1")
        )
    finally:
        queues.close()


@pytest.mark.parametrize(
    "action", ["show", "start", "pause", "resume", "cancel", "retry-failed"]
)
def test_unknown_campaign_is_one_line(make_config, action):
    cfg = make_config("sqlite")
    proc = campaignd(cfg, "campaign", action, "42")
    assert one_error_line(proc) == "campaignd: error: campaign 42 does not exist"


@contextlib.contextmanager
def _started_and_fanned_out(cfg, contacts_csv):
    """Campaign 1 created from the CSV and started by the CLI, then fanned
    out as a worker would (the fan-out is a worker's job); the database stays
    open in the block."""
    from daemon.app.tasks import Tasks
    from daemon.store.db import open_database

    assert create(cfg, contacts_csv).returncode == EXIT_OK
    assert campaignd(cfg, "campaign", "start", "1").returncode == EXIT_OK
    db = open_database(cfg)
    queues = make_queues(cfg)
    try:
        Tasks(cfg, queues).fan_out(1)
        yield
    finally:
        queues.close()
        db.close()


def test_messages_list_shows_a_campaigns_failed_messages(make_config, contacts_csv):
    from daemon.store.models import Message

    cfg = make_config("sqlite")
    with _started_and_fanned_out(cfg, contacts_csv):
        first = Message.select().order_by(Message.id).first()
        Message.update(status="failed", error="HTTP 400: invalid number").where(
            Message.id == first.id
        ).execute()

    listed = ok_json(cfg, "messages", "list", "--campaign", "1", "--status", "failed")
    assert [(m["id"], m["status"], m["error"]) for m in listed["messages"]] == [
        (first.id, "failed", "HTTP 400: invalid number")
    ]
    proc = campaignd(cfg, "messages", "list", "--campaign", "1")
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "CAMPAIGN",
        "PHONE",
        "KIND",
        "STATUS",
        "ATTEMPTS",
        "NEXT",
        "ERROR",
    ]
    assert len(lines) == 3
    assert "failed" in lines[1] and "HTTP 400: invalid number" in lines[1]
    assert "queued" in lines[2]

    assert one_error_line(campaignd(cfg, "messages", "list", "--campaign", "9")) == (
        "campaignd: error: campaign 9 does not exist"
    )
    bad = campaignd(cfg, "messages", "list", "--status", "lost")
    assert bad.returncode == 2 and "invalid choice: 'lost'" in bad.stderr


def test_show_says_what_is_retrying_what_failed_and_when_it_ends(
    make_config, contacts_csv
):
    import datetime as dt

    from daemon.store.models import Message

    cfg = make_config("sqlite", {"pacing": {"per_minute": 1.0, "daily_cap": 0}})
    with _started_and_fanned_out(cfg, contacts_csv):
        ann, bob = Message.select().order_by(Message.id)
        failed_at = dt.datetime(2026, 12, 3, 9, 30)
        Message.update(
            status="failed", error="HTTP 400: not a number", failed_at=failed_at
        ).where(Message.id == ann.id).execute()
        retry_at = dt.datetime(2031, 1, 1, 12, 0)
        Message.update(failures=2, next_attempt_at=retry_at, error="HTTP 503").where(
            Message.id == bob.id
        ).execute()

    shown = campaignd(cfg, "campaign", "show", "1")
    assert shown.returncode == EXIT_OK, shown.stderr
    text = shown.stdout
    assert "  retrying    1 message, next attempt 2031-01-01T12:00:00Z" in text
    assert (
        f"  last failed 2026-12-03T09:30:00Z {ann.phone} (message 1): "
        "HTTP 400: not a number"
    ) in text
    assert "Message 1 to send, the last by" in text.split("  eta         ")[1]
    as_json = ok_json(cfg, "campaign", "show", "1")
    assert as_json["sending"]["retrying"] == 1
    assert as_json["sending"]["last_failure"]["error"] == "HTTP 400: not a number"
