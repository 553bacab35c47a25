"""`campaignd contacts import|list|opt-out` as the operator runs them: a process."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from tests.helpers import run_cli
from tests.helpers import subprocess_env

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "csv"


def campaignd(cfg, *args: str, **popen) -> subprocess.CompletedProcess:
    """Run the CLI with this test's config; text output captured."""
    return run_cli(*args, cfg=cfg, **popen)


def contacts_json(cfg, limit: int = 1000) -> dict:
    proc = campaignd(cfg, "contacts", "list", "--json", "--limit", str(limit))
    assert proc.returncode == EXIT_OK, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.timeout(60)
def test_import_lists_every_rejected_row_and_keeps_the_valid_ones(any_mode_config):
    cfg = any_mode_config
    proc = campaignd(cfg, "contacts", "import", str(FIXTURES / "mixed_errors.csv"))
    assert proc.returncode == EXIT_FAILURE
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(
        "mixed_errors.csv: 2 contacts imported (2 created, 0 updated), "
        "1 duplicate merged, 5 rows rejected"
    )
    assert lines[1:] == [
        "line 3: invalid phone number '12345': too short",
        "line 4: expected 3 fields, got 2 (check the separator and quotes)",
        "line 5: missing phone number",
        "line 6: expected 3 fields, got 4 (quote values that contain the separator)",
        "line 9: invalid phone number 'not a number': contains letters",
    ]
    assert proc.stderr.splitlines() == [
        "campaignd: error: 5 rows rejected (listed above); 2 valid contacts imported"
    ]
    stored = contacts_json(cfg)
    assert stored["total"] == 2
    assert {c["phone"]: c["variables"] for c in stored["contacts"]} == {
        "+33612345678": {"city": "Nancy"},
        "+33611223344": {"city": "Metz"},
    }

    # The same file again: every valid row is an update, nothing duplicated.
    proc = campaignd(
        cfg, "contacts", "import", str(FIXTURES / "mixed_errors.csv"), "--json"
    )
    assert proc.returncode == EXIT_FAILURE
    report = json.loads(proc.stdout)
    assert (report["created"], report["updated"]) == (0, 2)
    assert report["rejected"][0] == {
        "line": 3,
        "reason": "invalid phone number '12345': too short",
    }
    assert len(report["rejected"]) == 5
    assert contacts_json(cfg)["total"] == 2


def test_strict_refuses_the_whole_file_and_imports_nothing(any_mode_config):
    cfg = any_mode_config
    path = FIXTURES / "mixed_errors.csv"
    proc = campaignd(cfg, "contacts", "import", str(path), "--strict")
    assert proc.returncode == EXIT_FAILURE
    assert proc.stdout.splitlines() == [
        "line 3: invalid phone number '12345': too short",
        "line 4: expected 3 fields, got 2 (check the separator and quotes)",
        "line 5: missing phone number",
        "line 6: expected 3 fields, got 4 (quote values that contain the separator)",
        "line 9: invalid phone number 'not a number': contains letters",
    ]
    assert proc.stderr.splitlines() == [
        f"campaignd: error: {path}: 5 rows rejected (listed above); strict: one "
        "bad row refuses the file, nothing was imported"
    ]
    assert contacts_json(cfg)["total"] == 0
    as_json = campaignd(cfg, "contacts", "import", str(path), "--strict", "--json")
    assert as_json.returncode == EXIT_FAILURE
    assert [r["line"] for r in json.loads(as_json.stdout)["rejected"]] == [
        3,
        4,
        5,
        6,
        9,
    ]
    assert contacts_json(cfg)["total"] == 0


def test_a_file_with_no_valid_row_is_refused(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = tmp_path / "bad.csv"
    path.write_text("phone,name\n12,Ann\nabc,Bob\n")
    proc = campaignd(cfg, "contacts", "import", str(path))
    assert proc.returncode == EXIT_FAILURE
    assert proc.stdout.splitlines() == [
        "line 2: invalid phone number '12': too short",
        "line 3: invalid phone number 'abc': contains letters",
    ]
    assert proc.stderr.splitlines() == [
        f"campaignd: error: {path}: 2 rows rejected (listed above); no valid row, "
        "nothing was imported"
    ]


def test_one_contact_is_singular_and_name_aliases_are_read(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = tmp_path / "one.csv"
    path.write_text("Téléphone;Nom;ville\n06 12 34 56 78;Ann;Paris\n")
    proc = campaignd(cfg, "contacts", "import", str(path))
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{path}: 1 contact imported (1 created, 0 updated), "
        "0 duplicates merged, 0 rows rejected"
    ]
    (contact,) = contacts_json(cfg)["contacts"]
    assert (contact["name"], contact["variables"]) == ("Ann", {"ville": "Paris"})


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_file_with_a_bom_is_read(make_config, tmp_path, encoding):
    cfg = make_config("sqlite")
    path = tmp_path / "unicode.csv"
    text = "phone\tname\tville\r\n0612345678\tRenée\tSète\r\n12\tBob\tNîmes\r\n"
    bom = "\ufeff" if encoding == "utf-16-be" else ""  # utf-16 writes its own
    path.write_bytes((bom + text).encode(encoding))
    proc = campaignd(cfg, "contacts", "import", str(path), "--json")
    assert proc.returncode == EXIT_FAILURE
    report = json.loads(proc.stdout)
    assert (report["encoding"], report["created"]) == ("utf-16", 1)
    assert report["rejected"] == [
        {"line": 3, "reason": "invalid phone number '12': too short"}
    ]
    (contact,) = contacts_json(cfg)["contacts"]
    assert (contact["name"], contact["variables"]) == ("Renée", {"ville": "Sète"})


def test_clean_import_exits_zero_with_a_summary(make_config):
    cfg = make_config("sqlite")
    path = FIXTURES / "excel_fr_bom_semicolon.csv"
    proc = campaignd(cfg, "contacts", "import", str(path), "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stderr == ""
    report = json.loads(proc.stdout)
    assert report == {
        "file": str(path),
        "encoding": "utf-8",
        "imported": 3,
        "created": 3,
        "updated": 0,
        "duplicates_merged": 0,
        "rejected": [],
    }
    names = {c["name"] for c in contacts_json(cfg)["contacts"]}
    assert names == {"Dupont; Marie", "Jean", 'Martin "Mo"'}


def test_region_option_reads_local_numbers(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = tmp_path / "be.csv"
    path.write_text("phone,name\n0470 12 34 56,Luc\n")
    proc = campaignd(cfg, "contacts", "import", str(path), "--region", "BE")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert contacts_json(cfg)["contacts"][0]["phone"] == "+32470123456"
    proc = campaignd(cfg, "contacts", "import", str(path), "--region", "ZZ")
    assert proc.returncode == EXIT_FAILURE
    assert proc.stderr.strip() == (
        "campaignd: error: unknown region 'ZZ' (expected e.g. FR, BE, US)"
    )


def test_windows_1252_file_is_imported_with_a_note(make_config):
    cfg = make_config("sqlite")
    proc = campaignd(cfg, "contacts", "import", str(FIXTURES / "excel_fr_cp1252.csv"))
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "note: the file is not UTF-8; read it as cp1252" in proc.stdout
    assert contacts_json(cfg)["contacts"][0]["name"] == "Renée"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_phone_column.csv", "no phone column in the header"),
        ("not_text.csv", "line 2: not UTF-8 nor Windows-1252 text"),
        ("missing.csv", "file not found"),
    ],
)
def test_fatal_errors_import_nothing(make_config, name, message):
    cfg = make_config("sqlite")
    proc = campaignd(cfg, "contacts", "import", str(FIXTURES / name))
    assert proc.returncode == EXIT_FAILURE
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("campaignd: error: ")
    assert message in proc.stderr
    assert contacts_json(cfg)["total"] == 0


def _big_csv(path: Path, rows: int) -> Path:
    with open(path, "w") as f:
        f.write("phone;name;city\n")
        for i in range(rows):
            f.write(f"+3361{i:07d};Contact number {i};Somewhere far away {i}\n")
    return path


@pytest.mark.timeout(90)
def test_progress_bar_only_on_a_terminal(make_config, tmp_path):
    cfg = make_config("sqlite")
    path = _big_csv(tmp_path / "big.csv", 12_000)
    assert path.stat().st_size > 512 * 1024

    piped = campaignd(cfg, "contacts", "import", str(path))
    assert piped.returncode == EXIT_OK, piped.stderr
    assert piped.stderr == ""

    # stderr on a pseudo-terminal, read while the command runs so that the
    # bar never blocks on a full terminal buffer.
    main_fd, terminal_fd = pty.openpty()
    cmd = [sys.executable, "-m", "daemon", "contacts", "import", str(path)]
    proc = subprocess.Popen(
        [*cmd, "-c", cfg.source],
        stdout=subprocess.PIPE,
        stderr=terminal_fd,
        text=True,
        env=subprocess_env(),
    )
    os.close(terminal_fd)
    try:
        drawn = _read_all(main_fd)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(main_fd)
    assert proc.returncode == EXIT_OK
    assert "reading   [" in drawn and "100%" in drawn
    assert "importing [" in drawn
    assert "0 created, 12000 updated" in stdout


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_list_shows_a_table_and_honours_limit(make_config):
    cfg = make_config("sqlite")
    campaignd(cfg, "contacts", "import", str(FIXTURES / "excel_fr_bom_semicolon.csv"))
    proc = campaignd(cfg, "contacts", "list", "--limit", "2")
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "PHONE",
        "NAME",
        "WHATSAPP",
        "OPTED",
        "OUT",
        "VARIABLES",
    ]
    assert "+33612345678" in lines[1] and "Dupont; Marie" in lines[1]
    assert "unknown" in lines[1]
    assert lines[-1] == "2 of 3 contacts"
    proc = campaignd(cfg, "contacts", "list", "--limit", "0")
    assert proc.returncode == EXIT_FAILURE
    assert "--limit: must be at least 1" in proc.stderr


@pytest.mark.slow
def test_opt_out_by_phone_in_any_format(make_config):
    cfg = make_config("sqlite")
    campaignd(cfg, "contacts", "import", str(FIXTURES / "excel_fr_bom_semicolon.csv"))
    proc = campaignd(cfg, "contacts", "opt-out", "06.12.34.56.78")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.strip() == "+33612345678 opted out"
    again = campaignd(cfg, "contacts", "opt-out", "+33612345678", "--json")
    assert again.returncode == EXIT_OK
    assert json.loads(again.stdout)["opted_out_at"]
    listed = {c["phone"]: c["opted_out_at"] for c in contacts_json(cfg)["contacts"]}
    assert listed["+33612345678"] and not listed["+33781223344"]

    unknown = campaignd(cfg, "contacts", "opt-out", "0699999999")
    assert unknown.returncode == EXIT_FAILURE
    assert unknown.stderr.strip() == (
        "campaignd: error: no contact with phone number +33699999999"
    )
    invalid = campaignd(cfg, "contacts", "opt-out", "12")
    assert invalid.returncode == EXIT_FAILURE
    assert "invalid phone number '12'" in invalid.stderr
