"""The PostgreSQL import (each chunk COPYed into a staging table, then one
INSERT ... SELECT ... ON CONFLICT) stores the same contacts, with the same
merges, counts and rejections, as the SQLite one (executemany)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.domain.contacts import ContactRow
from daemon.domain.contacts import import_csv_file
from daemon.domain.contacts import import_csv_text
from daemon.domain.contacts import import_rows
from daemon.domain.contacts.upsert import _encode_variables
from daemon.store.models import Contact
from daemon.store.models import WaStatus
from daemon.store.models import utcnow
from tests.send_helpers import close_db
from tests.send_helpers import open_db

# Values COPY must escape (backslashes, tabs, line breaks, "\N", quotes),
# numbers known before the import, duplicates within one chunk and across
# chunks, bad rows of each kind.
LINES = [
    "phone;name;city;note",
    "+33612345678;Ana;Lyon;first",
    "06 12 34 56 79;;Paris;",  # known: no name, keeps the stored one
    '0612345680;"Cléa \\N";"Saint-Étienne";"tab\there"',
    "12345;Bad;Lyon;x",  # too short
    "+33 6 12 34 56 78;;Nantes;again",  # a duplicate of line 2, merged
    '0033612345681;"Dan ""the"" man";"Li\\lle";"two\r\nlines"',
    "+33612345682;Eve;Lyon",  # a field short
    "",
    ";;;",
    '"+32 470 12 34 56";"Fay; Jr";Bruxelles;\\.',
    "06 12 34 56 79;Bobby;;later",  # a duplicate of line 3, in another chunk
    "abc;Gus;Lyon;x",
    "+33612345683;Hal;Lyon;x;extra",
    "+39 06 1234 5678;Ivo;;{}",
    "0612345684;Jo;Lyon;" + "n" * 1001,  # a value too long
]


def seed() -> None:
    """Contacts known before the import, with what it must keep."""
    Contact.create(
        phone="+33612345679",
        name="Old Bob",
        variables={"city": "Caen", "vip": "yes"},
        wa_status=WaStatus.VALID,
        opted_out_at=utcnow(),
    )
    Contact.create(phone="+393912345678", name="Untouched", variables={"a": "b"})


def snapshot() -> list[tuple]:
    return sorted(
        (
            c.phone,
            c.name,
            json.dumps(c.variables, ensure_ascii=False),  # key order included
            c.wa_status,
            c.opted_out_at is not None,
        )
        for c in Contact.select()
    )


def run_imports(csv_path) -> dict:
    """Every import entry point over the same data, then a re-import."""
    seed()
    parsed, result = import_csv_file(
        csv_path, "FR", processes=1, chunk_rows=3, with_ids=True
    )
    ids = dict(Contact.select(Contact.phone, Contact.id).tuples())
    by_id = {v: k for k, v in ids.items()}
    first = {
        "contacts": snapshot(),
        "errors": parsed.errors,
        "duplicates": parsed.duplicates_merged,
        "counts": (result.created, result.updated),
        "id_phones": [by_id[i] for i in result.contact_ids],
    }
    again, result = import_csv_text(csv_path.read_text("utf-8-sig"), with_ids=True)
    second = {
        "contacts": snapshot(),
        "errors": again.errors,
        "counts": (result.created, result.updated),
        "id_phones": [by_id[i] for i in result.contact_ids],
        "ids_kept": dict(Contact.select(Contact.phone, Contact.id).tuples()) == ids,
    }
    rows = [
        ContactRow(1, "+33612345678", "", {"city": "Metz", "new": "1"}),
        ContactRow(2, "+33699999999", "Zed", {}),
        # The same number twice in one call (not from a parser, which merges):
        # the last row wins.
        ContactRow(3, "+33699999999", "Zoe", {"k": "v"}),
    ]
    result = import_rows(rows)
    third = {
        "contacts": snapshot(),
        "counts": (result.created, result.updated),
        "id_phones": [Contact.get_by_id(i).phone for i in result.contact_ids],
    }
    return {"first": first, "second": second, "third": third}


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "contacts.csv"
    path.write_text("\r\n".join(LINES) + "\r\n", encoding="utf-8-sig")
    return path


@pytest.mark.postgres
def test_postgres_stores_what_sqlite_stores(make_config, pg_url, tmp_path, csv_path):
    db = open_db(make_config("sqlite", {"daemon": {"data_dir": str(tmp_path / "d")}}))
    try:
        expected = run_imports(csv_path)
    finally:
        close_db(db)
    db = open_db(make_config("sqlite", {"database": {"url": pg_url}}))
    try:
        got = run_imports(csv_path)
    finally:
        close_db(db)
    assert got == expected
    # What the user sees, spelled out once.
    contacts = {c[0]: c for c in expected["first"]["contacts"]}
    assert contacts["+33612345678"][1:3] == (
        "Ana",
        '{"city": "Nantes", "note": "again"}',
    )
    assert contacts["+33612345679"] == (
        "+33612345679",
        "Bobby",
        '{"city": "Paris", "vip": "yes", "note": "later"}',
        WaStatus.VALID,
        True,
    )
    assert contacts["+33612345680"][1:3] == (
        "Cléa \\N",
        '{"city": "Saint-Étienne", "note": "tab\\there"}',
    )
    assert contacts["+33612345681"][1:3] == (
        'Dan "the" man',
        '{"city": "Li\\\\lle", "note": "two\\r\\nlines"}',
    )
    assert contacts["+32470123456"][2] == '{"city": "Bruxelles", "note": "\\\\."}'
    assert [line for line, _ in expected["first"]["errors"]] == [5, 9, 14, 15, 17]
    assert expected["first"]["duplicates"] == 2
    assert expected["first"]["counts"] == (5, 1)
    assert expected["second"]["counts"] == (0, 6)
    assert expected["second"]["ids_kept"]
    assert dict((c[0], c[1:3]) for c in expected["third"]["contacts"])[
        "+33699999999"
    ] == ("Zoe", '{"k": "v"}')


@given(
    st.dictionaries(
        st.one_of(st.text(), st.integers()),
        st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text())),
    )
)
def test_variables_are_written_as_json_dumps_writes_them(variables):
    assert _encode_variables(variables) == json.dumps(variables, ensure_ascii=False)
