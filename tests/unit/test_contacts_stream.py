"""import_csv_file (streamed, numbers normalised in worker processes) gives the
same contacts, rejections and counts as parse_csv_file + import_rows."""

from __future__ import annotations

import pytest

from daemon.domain.contacts import import_csv_file
from daemon.domain.contacts import import_rows
from daemon.domain.contacts import parse_csv_file
from daemon.store.models import Contact
from tests.send_helpers import close_db
from tests.send_helpers import open_db

LINES = [
    "phone;name;city;order",
    "+33612345678;Ana;Lyon;1",
    "06 12 34 56 79;Bob;;2",
    "0612345680;Cléa;Paris;3",
    "12345;Bad;Lyon;4",  # too short
    "+33 6 12 34 56 78;;Nantes;5",  # a duplicate of line 2, other format
    "0033612345681;Dan;Lille;6",
    "+33612345682;Eve;Lyon",  # a field short
    "",
    ";;;",
    '"+32 470 12 34 56";"Fay; Jr";Bruxelles;8',
    "06 12 34 56 79;Bobby;Lyon;9",  # a duplicate of line 3, in another chunk
    "abc;Gus;Lyon;10",
    "+33612345683;Hal;Lyon;11;extra",
    "+39 06 1234 5678;Ivo;Roma;12",
]


def snapshot() -> list[tuple]:
    return sorted(
        (c.phone, c.name, tuple(sorted(c.variables.items()))) for c in Contact.select()
    )


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "contacts.csv"
    path.write_text("\r\n".join(LINES) + "\r\n", encoding="utf-8-sig")
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def make_db(request, make_config, tmp_path):
    """A function opening an empty database (SQLite: a new file each time)."""
    pg = request.getfixturevalue("pg_url") if request.param == "postgres" else None

    def opened(name: str):
        if pg:
            db = open_db(make_config("sqlite", {"database": {"url": pg}}))
            Contact.delete().execute()
            return db
        data_dir = str(tmp_path / name)
        return open_db(make_config("sqlite", {"daemon": {"data_dir": data_dir}}))

    return opened


def run(make_db, how, csv_path):
    db = make_db("classic" if how == "classic" else "streamed")
    try:
        # Known already: one of the file's numbers is an update.
        Contact.create(phone="+33612345681", name="Old", variables={"vip": "yes"})
        if how == "classic":
            parsed = parse_csv_file(csv_path, "FR")
            result = import_rows(parsed.rows)
        else:
            parsed, result = import_csv_file(csv_path, "FR", **how)
        return {
            "contacts": snapshot(),
            "errors": parsed.errors,
            "duplicates": parsed.duplicates_merged,
            "created": result.created,
            "updated": result.updated,
            "encoding": parsed.encoding,
        }
    finally:
        close_db(db)


@pytest.mark.parametrize(
    "how",
    [
        {"processes": 1, "chunk_rows": 4},
        {"processes": 2, "chunk_rows": 3},
        {"processes": 1},
    ],
    ids=["serial-chunks", "two-processes", "serial-one-chunk"],
)
def test_streamed_import_matches_the_merged_import(make_db, csv_path, how):
    expected = run(make_db, "classic", csv_path)
    assert expected["duplicates"] == 2
    assert len(expected["errors"]) == 4
    assert run(make_db, how, csv_path) == expected


def test_a_windows_1252_file_is_imported_the_same(make_db, csv_path):
    csv_path.write_bytes(("\r\n".join(LINES) + "\r\n").encode("cp1252"))
    expected = run(make_db, "classic", csv_path)
    assert expected["encoding"] == "cp1252"
    assert run(make_db, {"processes": 1, "chunk_rows": 4}, csv_path) == expected
