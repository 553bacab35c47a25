"""One rule for contacts, CLI and admin API alike (daemon/app/service.py).

The same bad CSV goes through `campaignd contacts import` / `campaign create
--contacts` (a process) and through /api/v1 (a real HTTP server, answers
checked against the OpenAPI document): the same counts and the same rejected
lines, and `--strict` / `strict` refuses the same file everywhere.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from tests.helpers import run_cli
from tests.integration.test_api import TOKEN
from tests.integration.test_api import Api

pytestmark = pytest.mark.timeout(120)

# Line numbers as a user counts them: the header is line 1, the blank line 5
# is skipped, the quoted name spanning lines 6-7 is one row at line 6.
BAD_CSV = (
    "Téléphone;Nom;city\n"  # 1: the aliases of phone and name
    "06 12 34 56 78;Ann;Paris\n"  # 2
    "12345;Bob;Lyon\n"  # 3: too short
    "07 81 22 33 44;Cid\n"  # 4: a field missing
    "\n"  # 5
    '06 98 76 54 32;"Dana\nMarie";Lille\n'  # 6-7
    "+33 6 12 34 56 78;;Nancy\n"  # 8: Ann again, merged
    "not a number;Gus;Pau\n"  # 9: letters
)
REJECTED = [
    {"line": 3, "reason": "invalid phone number '12345': too short"},
    {"line": 4, "reason": "expected 3 fields, got 2 (check the separator and quotes)"},
    {"line": 9, "reason": "invalid phone number 'not a number': contains letters"},
]
M1 = "Bonjour {name} de {city}"


def campaignd(cfg, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, cfg=cfg)


@pytest.fixture
def bad_csv(tmp_path):
    path = tmp_path / "contacts.csv"
    path.write_text(BAD_CSV, encoding="utf-8")
    return path


@pytest.fixture
def cli_cfg(make_config, tmp_path):
    return make_config("sqlite", {"daemon": {"data_dir": str(tmp_path / "cli")}})


@pytest.fixture
def api(make_config, tmp_path):
    cfg = make_config(
        "sqlite",
        {"daemon": {"data_dir": str(tmp_path / "api")}, "web": {"api_token": TOKEN}},
    )
    client = Api(cfg)
    yield client
    client.close()


def counts(report: dict) -> tuple:
    return (report["created"], report["updated"], report["duplicates_merged"])


def test_import_reports_the_same_counts_and_lines(bad_csv, cli_cfg, api):
    proc = campaignd(cli_cfg, "contacts", "import", str(bad_csv), "--json")
    assert proc.returncode == EXIT_FAILURE, proc.stderr
    cli = json.loads(proc.stdout)
    assert counts(cli) == (2, 0, 1)
    assert cli["rejected"] == REJECTED

    body = api.call(
        "POST",
        "/api/v1/contacts/import",
        data=BAD_CSV.encode(),
        headers={"Content-Type": "text/csv"},
    )
    assert body.status_code == 200, body.text
    assert counts(body.json()) == counts(cli)
    assert body.json()["errors"] == cli["rejected"]

    # The same text in a JSON body: the same rule, the contacts now updated.
    field = api.call("POST", "/api/v1/contacts/import", json={"contacts": BAD_CSV})
    assert counts(field.json()) == (0, 2, 1)
    assert field.json()["errors"] == REJECTED
    again = campaignd(cli_cfg, "contacts", "import", str(bad_csv), "--json")
    assert counts(json.loads(again.stdout)) == (0, 2, 1)

    ann = api.call("GET", "/api/v1/contacts/%2B33612345678", "/api/v1/contacts/{ref}")
    assert (ann.json()["name"], ann.json()["variables"]) == ("Ann", {"city": "Nancy"})


def test_strict_refuses_the_same_file_everywhere(bad_csv, cli_cfg, api):
    proc = campaignd(cli_cfg, "contacts", "import", str(bad_csv), "--strict", "--json")
    assert proc.returncode == EXIT_FAILURE
    assert json.loads(proc.stdout)["rejected"] == REJECTED
    listed = campaignd(cli_cfg, "contacts", "list", "--json")
    assert json.loads(listed.stdout)["total"] == 0

    refused = api.call(
        "POST",
        "/api/v1/contacts/import?strict=true",
        data=BAD_CSV.encode(),
        headers={"Content-Type": "text/csv"},
    )
    assert refused.status_code == 400
    assert refused.json()["errors"] == REJECTED
    assert "strict: nothing was imported" in refused.json()["description"]
    as_field = api.call(
        "POST",
        "/api/v1/contacts/import",
        json={"contacts": BAD_CSV, "strict": True},
    )
    assert (as_field.status_code, as_field.json()["errors"]) == (400, REJECTED)
    ann = api.call("GET", "/api/v1/contacts/%2B33612345678", "/api/v1/contacts/{ref}")
    assert ann.status_code == 404


def test_campaign_create_follows_the_same_rule(bad_csv, cli_cfg, api):
    create = ["campaign", "create", "--name", "Spring", "--message1", M1]
    create += ["--message2", "Merci {name}", "--contacts", str(bad_csv)]
    strict = campaignd(cli_cfg, *create, "--strict", "--json")
    assert strict.returncode == EXIT_FAILURE
    assert json.loads(strict.stdout)["rejected"] == REJECTED
    body = {"name": "Spring", "message1": M1, "message2": "Merci {name}"}
    refused = api.call(
        "POST", "/api/v1/campaigns", json={**body, "contacts": BAD_CSV, "strict": True}
    )
    assert (refused.status_code, refused.json()["errors"]) == (400, REJECTED)
    assert api.call("GET", "/api/v1/campaigns").json()["campaigns"] == []

    proc = campaignd(cli_cfg, *create, "--json")
    assert proc.returncode == EXIT_FAILURE, proc.stderr  # rows were rejected
    cli = json.loads(proc.stdout)
    created = api.call("POST", "/api/v1/campaigns", json={**body, "contacts": BAD_CSV})
    assert created.status_code == 201, created.text
    via_api = created.json()
    assert (cli["contacts"], via_api["contacts"]) == (2, 2)
    assert counts(cli["imported"]) == counts(via_api["import"]) == (2, 0, 1)
    assert cli["imported"]["rejected"] == via_api["import"]["errors"] == REJECTED

    # A variable no column provides: refused before anything is imported.
    lacking = {**body, "message2": "{zip}", "contacts": BAD_CSV}
    missing = api.call("POST", "/api/v1/campaigns", json=lacking)
    assert missing.status_code == 400
    assert missing.json()["description"] == (
        "contacts: template variable {zip} is not a column of the contacts "
        "(columns: Téléphone ({phone}), Nom ({name}), city)"
    )
    no_zip = campaignd(cli_cfg, *create[:-3], "{zip}", "--contacts", str(bad_csv))
    assert no_zip.returncode == EXIT_FAILURE
    assert no_zip.stderr.strip().endswith(
        "template variable {zip} is not a column of the contacts "
        "(columns: Téléphone ({phone}), Nom ({name}), city)"
    )
    listed = campaignd(cli_cfg, "campaign", "list", "--json")
    assert listed.returncode == EXIT_OK
    assert [c["id"] for c in json.loads(listed.stdout)] == [cli["id"]]
    assert len(api.call("GET", "/api/v1/campaigns").json()["campaigns"]) == 1


def test_json_records_follow_the_same_rule(api):
    records = [
        {"phone": "0612345678", "name": "Ann", "city": "Paris"},
        {"phone": "12", "name": "Bob"},
        {"name": "no phone"},
    ]
    errors = [
        {"line": 1, "reason": "invalid phone number '12': too short"},
        {"line": 2, "reason": "missing phone number"},
    ]
    path = "/api/v1/contacts/import"
    refused = api.call("POST", path, json={"contacts": records, "strict": True})
    assert (refused.status_code, refused.json()["errors"]) == (400, errors)
    ann = api.call("GET", "/api/v1/contacts/%2B33612345678", "/api/v1/contacts/{ref}")
    assert ann.status_code == 404
    imported = api.call("POST", path, json={"contacts": records})
    assert imported.status_code == 200
    assert counts(imported.json()) == (1, 0, 0)
    assert imported.json()["errors"] == errors
    none_valid = api.call("POST", path, json={"contacts": records[1:]})
    assert none_valid.status_code == 400
    assert none_valid.json()["description"] == (
        "contacts: no valid contact (2 rows rejected)"
    )
