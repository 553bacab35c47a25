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


@pytest.mark.parametrize(
    ("codec", "reported"),
    [("cp1252", "cp1252"), ("utf-16-le", "utf-16"), ("utf-16-be", "utf-16")],
)
def test_a_windows_1252_or_utf16_file_is_imported_the_same(
    make_db, csv_path, codec, reported
):
    text = "\r\n".join(LINES) + "\r\n"
    if codec.startswith("utf-16"):
        text = "\ufeff" + text  # as Excel's "Unicode text" writes it
    csv_path.write_bytes(text.encode(codec))
    expected = run(make_db, "classic", csv_path)
    assert expected["encoding"] == reported
    assert run(make_db, {"processes": 1, "chunk_rows": 4}, csv_path) == expected


def test_a_windows_1252_file_costs_no_more_memory_than_utf8(make_config, tmp_path):
    """A legacy file is streamed as a UTF-8 one is (until 2026-12-07 it was
    read and decoded whole: the bytes and the text, twice its size, on top
    of what any import keeps per number). Python's allocations, peak."""
    import tracemalloc

    line = "+336{:08d};Zoé {};Orléans\r\n"
    rows = "".join(line.format(10_000_000 + i, i) for i in range(60_000))
    text = "phone;name;city\r\n" + rows

    def peak_of(codec: str) -> tuple[int, int]:
        path = tmp_path / f"{codec}.csv"
        path.write_bytes(text.encode(codec))
        data_dir = str(tmp_path / codec)
        db = open_db(make_config("sqlite", {"daemon": {"data_dir": data_dir}}))
        try:
            tracemalloc.start()
            try:
                parsed, result = import_csv_file(path, "FR", processes=1)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            close_db(db)
        assert (parsed.encoding, result.created) == (codec, 60_000)
        return peak, path.stat().st_size

    utf8_peak, _ = peak_of("utf-8")
    legacy_peak, size = peak_of("cp1252")
    assert legacy_peak < utf8_peak + size / 2, (utf8_peak, legacy_peak, size)


def test_a_file_neither_utf8_nor_windows_1252_far_down_is_refused_whole(
    make_db, tmp_path
):
    path = tmp_path / "late.csv"
    good = "".join(f"+336{10_000_000 + i:08d};é\n" for i in range(5_000))
    path.write_bytes(("phone;name\n" + good).encode("cp1252") + b"\x81\x8d\n")
    db = make_db("late")
    try:
        with pytest.raises(Exception, match="line 5002: not UTF-8 nor Windows-1252"):
            import_csv_file(path, "FR", processes=1, chunk_rows=100)
        assert Contact.select().count() == 0
    finally:
        close_db(db)
