"""Contacts in: phone normalisation, CSV and JSON parsing, and the upsert."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.domain.contacts import ContactRow
from daemon.domain.contacts import decode_csv_bytes
from daemon.domain.contacts import header_variables
from daemon.domain.contacts import import_rows
from daemon.domain.contacts import normalize_phone
from daemon.domain.contacts import parse_csv_file
from daemon.domain.contacts import parse_csv_text
from daemon.domain.contacts import parse_records
from daemon.errors import InputError
from daemon.store.db import open_database
from daemon.store.models import Contact
from daemon.store.models import WaStatus
from daemon.store.models import utcnow

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "csv"


# --- normalize_phone ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "06 12 34 56 78",
        "0612345678",
        "06.12.34.56.78",
        "06-12-34-56-78",
        "+33 6 12 34 56 78",
        "+33612345678",
        "0033 6 12 34 56 78",
        "(0)6 12 34 56 78",
        "  06 12 34 56 78  ",
    ],
)
def test_french_numbers_in_every_usual_format(raw):
    assert normalize_phone(raw, "FR") == "+33612345678"


def test_region_decides_local_numbers():
    assert normalize_phone("0470 12 34 56", "BE") == "+32470123456"
    assert normalize_phone("(415) 555-2671", "us") == "+14155552671"
    # An international number ignores the region.
    assert normalize_phone("+44 7911 123456", "FR") == "+447911123456"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "missing phone number"),
        ("   ", "missing phone number"),
        ("123", "invalid phone number '123': too short"),
        ("06 12 34", "invalid phone number '06 12 34': too short"),
        ("06 12 34 56 78 99", "too long"),
        ("abc", "invalid phone number 'abc': contains letters"),
        ("06 CALL ME", "contains letters"),
        ("+999 123 456 789", "unknown country code"),
        ("+33 0 12 34 56 78", "not a valid FR number"),
    ],
)
def test_invalid_numbers_say_why(raw, reason):
    with pytest.raises(InputError, match=reason.replace("(", r"\(")):
        normalize_phone(raw, "FR")


def test_unknown_region_is_an_error():
    with pytest.raises(InputError, match="unknown region 'XX'"):
        normalize_phone("0612345678", "XX")


# --- CSV parsing ------------------------------------------------------------------


def test_excel_export_with_bom_semicolons_and_accented_header():
    parsed = parse_csv_file(FIXTURES / "excel_fr_bom_semicolon.csv")
    assert parsed.errors == []
    assert parsed.encoding == "utf-8"
    assert [(r.line, r.phone, r.name) for r in parsed.rows] == [
        (2, "+33612345678", "Dupont; Marie"),
        (3, "+33781223344", "Jean"),
        (6, "+33698765432", 'Martin "Mo"'),
    ]
    # "Téléphone" is the phone column; other headers are kept as written.
    assert parsed.rows[0].variables == {
        "Ville": "Saint-Étienne",
        "Code postal": "42000",
    }


def test_windows_1252_file_is_read_and_flagged():
    parsed = parse_csv_file(FIXTURES / "excel_fr_cp1252.csv")
    assert parsed.encoding == "cp1252"
    assert parsed.rows[0].name == "Renée"
    assert parsed.rows[0].variables == {"ville": "Orléans"}


def test_bytes_that_are_no_text_encoding_are_a_fatal_error():
    with pytest.raises(InputError, match=r"not_text.csv: line 2: not UTF-8"):
        parse_csv_file(FIXTURES / "not_text.csv")


def test_tab_separated_with_international_numbers():
    parsed = parse_csv_file(FIXTURES / "tab_separated.tsv")
    assert [(r.phone, r.name, r.variables) for r in parsed.rows] == [
        ("+447911123456", "Alice", {"city": "London"}),
        # An empty cell is not a variable.
        ("+14155552671", "Bob", {}),
    ]


def test_every_bad_row_is_reported_with_its_line_and_reason():
    parsed = parse_csv_file(FIXTURES / "mixed_errors.csv")
    assert parsed.errors == [
        (3, "invalid phone number '12345': too short"),
        (4, "expected 3 fields, got 2 (check the separator and quotes)"),
        (5, "missing phone number"),
        (6, "expected 3 fields, got 4 (quote values that contain the separator)"),
        (9, "invalid phone number 'not a number': contains letters"),
    ]
    assert [(r.line, r.phone) for r in parsed.rows] == [
        (2, "+33612345678"),
        (7, "+33611223344"),
    ]
    # Line 8 repeats line 2's number: merged, empty name kept from line 2.
    assert parsed.duplicates_merged == 1
    assert parsed.rows[0].name == "Ann"
    assert parsed.rows[0].variables == {"city": "Nancy"}


def test_duplicates_merge_field_by_field_later_non_empty_values_win():
    text = (
        "phone,name,city,zip\n"
        "0612345678,Ann,Paris,\n"
        "+33612345678,,Lyon,69001\n"
        "0033612345678,Annie,,\n"
    )
    parsed = parse_csv_text(text)
    assert parsed.duplicates_merged == 2
    assert parsed.rows == [
        ContactRow(2, "+33612345678", "Annie", {"city": "Lyon", "zip": "69001"})
    ]


def test_empty_and_blank_lines_are_skipped_and_lines_still_count():
    text = "\n\nphone;name\n\n0612345678;Ann\n;\n  ;  \n0781223344;Bob\n\n"
    parsed = parse_csv_text(text)
    assert parsed.errors == []
    assert [(r.line, r.name) for r in parsed.rows] == [(5, "Ann"), (8, "Bob")]


def test_quoted_fields_hold_separators_quotes_and_line_breaks():
    text = (
        "phone,name,note\n"
        '"06 12 34 56 78","Doe, John","said ""hi""\nthen left"\n'
        "bad,x,y\n"
    )
    parsed = parse_csv_text(text)
    assert parsed.rows[0].name == "Doe, John"
    assert parsed.rows[0].variables == {"note": 'said "hi"\nthen left'}
    # The row after a two-line record is on line 4.
    assert parsed.errors == [(4, "invalid phone number 'bad': contains letters")]


def test_separator_is_taken_from_the_header_outside_quotes():
    # Two commas inside quotes, one semicolon outside: ';' separates.
    parsed = parse_csv_text('phone;"a, b, c"\n0612345678;"x, y"\n')
    assert parsed.errors == []
    assert parsed.rows[0].variables == {"a, b, c": "x, y"}


def test_phone_aliases_and_case_insensitive_header():
    for header in ("PHONE", "Mobile", "numéro", "Téléphone", " tel "):
        parsed = parse_csv_text(f"{header},NAME\n0612345678,Ann\n")
        assert parsed.rows[0].phone == "+33612345678", header
        assert parsed.rows[0].name == "Ann"
    # An exact "phone" wins over an alias, which becomes a variable.
    parsed = parse_csv_text("mobile,phone\n0781223344,0612345678\n")
    assert parsed.rows[0].phone == "+33612345678"
    assert parsed.rows[0].variables == {"mobile": "0781223344"}


def test_name_aliases_work_as_the_phone_aliases_do():
    for header in ("NAME", "Nom", "prénom", " Full Name ", "first_name"):
        parsed = parse_csv_text(f"phone,{header},city\n0612345678,Ann,Metz\n")
        assert parsed.rows[0].name == "Ann", header
        assert parsed.rows[0].variables == {"city": "Metz"}, header
    # An exact "name" wins over an alias, which becomes a variable; else the
    # leftmost alias is the name.
    parsed = parse_csv_text("phone,nom,name\n0612345678,Martin,Ann\n")
    assert (parsed.rows[0].name, parsed.rows[0].variables) == ("Ann", {"nom": "Martin"})
    parsed = parse_csv_text("phone,nom,prénom\n0612345678,Martin,Ann\n")
    assert parsed.rows[0].name == "Martin"
    assert parsed.rows[0].variables == {"prénom": "Ann"}
    assert header_variables("tel;Nom;city\n") == {
        "phone": "tel",
        "name": "Nom",
        "city": "city",
    }


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_with_a_bom_is_decoded(tmp_path, encoding):
    path = tmp_path / "u16.csv"
    path.write_bytes("\ufeffphone;nom;ville\n0612345678;Renée;Sète\n".encode(encoding))
    parsed = parse_csv_file(path)
    assert parsed.encoding == "utf-16"
    assert [(r.phone, r.name, r.variables) for r in parsed.rows] == [
        ("+33612345678", "Renée", {"ville": "Sète"})
    ]
    with pytest.raises(InputError, match="CSV: invalid UTF-16 text"):
        decode_csv_bytes(b"\xff\xfe\x00\xd8")  # a lone surrogate


def test_trailing_separators_of_spreadsheets_are_tolerated():
    parsed = parse_csv_text("phone;name;\n0612345678;Ann;\n0781223344;Bob;;;\n")
    assert parsed.errors == []
    assert [r.variables for r in parsed.rows] == [{}, {}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("\n\n  \n", "empty file"),
        ("name,city\nAnn,Paris\n", "no phone column in the header"),
        ("phone,city,city\n0612345678,a,b\n", "duplicate column 'city'"),
    ],
)
def test_fatal_header_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_csv_text(text)


def test_fatal_errors_name_the_file():
    with pytest.raises(InputError, match=r"no_phone_column.csv: no phone column"):
        parse_csv_file(FIXTURES / "no_phone_column.csv")
    with pytest.raises(InputError, match=r"missing.csv: file not found"):
        parse_csv_file(FIXTURES / "missing.csv")


def test_too_long_values_are_rejected_per_row():
    text = f"phone,name\n0612345678,{'x' * 201}\n0781223344,ok\n"
    parsed = parse_csv_text(text)
    assert parsed.errors == [(2, "name longer than 200 characters")]
    assert len(parsed.rows) == 1


def test_progress_reports_bytes_up_to_the_total(tmp_path):
    path = tmp_path / "big.csv"
    lines = ["phone,name"] + [f"+3361{i:07d},n{i}" for i in range(12_000)]
    path.write_text("\n".join(lines) + "\n")
    seen = []
    parsed = parse_csv_file(
        path, progress=lambda done, total: seen.append((done, total))
    )
    assert len(parsed.rows) == 12_000
    total = path.stat().st_size
    assert seen[-1] == (total, total)
    assert len(seen) >= 3
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


# --- JSON records ---------------------------------------------------------------


def test_records_use_the_same_rules_with_zero_based_indexes():
    parsed = parse_records(
        [
            {"phone": "06 12 34 56 78", "name": "Ann", "city": "Paris", "age": 31},
            {"name": "no phone"},
            "not an object",
            {"phone": "0612345678", "city": "Lyon", "vip": True, "note": None},
            {"phone": "0781223344", "tags": ["a"]},
        ]
    )
    assert parsed.errors == [
        (1, "missing phone number"),
        (2, "must be an object with a 'phone' key"),
        (4, "field 'tags' must be a string or a number"),
    ]
    assert parsed.duplicates_merged == 1
    assert parsed.rows == [
        ContactRow(
            0,
            "+33612345678",
            "Ann",
            {"city": "Lyon", "age": "31", "vip": "true"},
        )
    ]


def test_records_must_be_a_list():
    with pytest.raises(InputError, match="must be a list"):
        parse_records({"phone": "0612345678"})


# --- import_rows (real SQLite) --------------------------------------------------


@pytest.fixture
def db(make_config):
    database = open_database(make_config("sqlite"), migrate_schema=True)
    with database.connection_context():
        yield database


def test_import_creates_then_updates_and_merges_variables(db):
    first = import_rows(
        [
            ContactRow(2, "+33612345678", "Ann", {"city": "Paris", "zip": "75001"}),
            ContactRow(3, "+33781223344", "Bob", {}),
        ]
    )
    assert (first.created, first.updated) == (2, 0)
    Contact.update(wa_status=WaStatus.VALID, opted_out_at=utcnow()).where(
        Contact.phone == "+33781223344"
    ).execute()

    second = import_rows(
        [
            ContactRow(2, "+33781223344", "", {"city": "Lyon"}),
            ContactRow(3, "+33612345678", "Annie", {"city": "Nice"}),
            ContactRow(4, "+33698765432", "Cid", {}),
        ]
    )
    assert (second.created, second.updated) == (1, 2)
    # ids come back in row order and keep existing contacts' ids.
    assert second.contact_ids[:2] == [first.contact_ids[1], first.contact_ids[0]]
    ann = Contact.get(Contact.phone == "+33612345678")
    assert ann.name == "Annie"
    assert ann.variables == {"city": "Nice", "zip": "75001"}
    bob = Contact.get(Contact.phone == "+33781223344")
    # No name in the row keeps the old one; status and opt-out are untouched.
    assert bob.name == "Bob"
    assert bob.variables == {"city": "Lyon"}
    assert bob.wa_status == WaStatus.VALID
    assert bob.opted_out_at is not None


def test_import_is_one_transaction(db):
    rows = [ContactRow(i, f"+3361{i:07d}", f"n{i}", {}) for i in range(2, 4000)]
    # A phone too long for PostgreSQL's varchar would fail mid-way there; on
    # SQLite we force a failure in the second chunk with a NOT NULL violation.
    rows.append(ContactRow(4000, None, "broken", {}))  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - the driver's IntegrityError
        import_rows(rows)
    assert Contact.select().count() == 0


def test_import_of_nothing_is_fine(db):
    assert import_rows([]).contact_ids == []
