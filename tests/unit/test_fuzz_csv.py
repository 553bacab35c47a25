"""CSV fuzzing: any text gives a ParsedCsv or an InputError, never another exception.

Three generators: raw text over a CSV-heavy alphabet (separators, quotes, line
breaks, BOM, NUL, digits, '+'), structured files (a header with a phone
column, random cells, ragged rows, quoted fields with separators and line
breaks inside), and raw bytes through `decode_csv_bytes` (what the CLI and the
API do with an upload). Every accepted row must hold an E.164 number, and
every rejected row must say on which line it is.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from daemon.domain.contacts import ParsedCsv
from daemon.domain.contacts import decode_csv_bytes
from daemon.domain.contacts import parse_csv_text
from daemon.errors import InputError

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
CSV_CHARS = ";,\t\"'\r\n \ufeff\x00+0123456789abcXYZéà€()-./"

csv_text = st.one_of(
    st.text(alphabet=CSV_CHARS, max_size=300),
    st.text(max_size=200),
)
cells = st.one_of(
    st.text(alphabet=CSV_CHARS, max_size=20),
    st.sampled_from(
        [
            "+33612345678",
            "06 12 34 56 78",
            "0612345678",
            "+1 202-555-0143",
            "0033612345678",
            "+33 6 12 34 56 78 ext 9",
            "",
            "phone",
            "nan",
            "1e9",
            "+" + "9" * 30,
        ]
    ),
    st.text(max_size=10),
)
header_names = st.one_of(
    st.sampled_from(
        [
            "phone",
            "Phone",
            "telephone",
            "téléphone",
            "mobile",
            "name",
            "Nom",
            "city",
            "",
            " ",
            "phone",
        ]
    ),
    st.text(alphabet=CSV_CHARS, max_size=8),
)


def quote(cell: str, sep: str) -> str:
    if any(ch in cell for ch in (sep, '"', "\n", "\r")):
        return '"' + cell.replace('"', '""') + '"'
    return cell


@st.composite
def structured_csv(draw) -> str:
    sep = draw(st.sampled_from([";", ",", "\t"]))
    header = draw(st.lists(header_names, min_size=1, max_size=5))
    if draw(st.booleans()):
        header.insert(draw(st.integers(0, len(header))), "phone")
    lines = [sep.join(quote(h, sep) for h in header)]
    for _ in range(draw(st.integers(0, 8))):
        width = len(header) + draw(st.integers(-2, 2))
        row = draw(st.lists(cells, min_size=max(width, 0), max_size=max(width, 0)))
        lines.append(sep.join(quote(c, sep) for c in row))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(lines)
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text


def check(parsed: ParsedCsv) -> None:
    assert isinstance(parsed, ParsedCsv)
    for row in parsed.rows:
        assert E164.match(row.phone), row
        assert row.line >= 1
    for line, reason in parsed.errors:
        assert isinstance(line, int) and line >= 1
        assert reason and "\n" not in reason


def parse_or_refuse(text: str, region: str = "FR") -> None:
    try:
        parsed = parse_csv_text(text, region)
    except InputError as exc:
        assert str(exc), "an InputError must say what is wrong"
        return
    check(parsed)


@FUZZ
@given(csv_text)
def test_any_text_is_parsed_or_refused(text):
    parse_or_refuse(text)


@FUZZ
@given(structured_csv(), st.sampled_from(["FR", "BE", "US", "ZZ", "", "fr"]))
def test_structured_files_in_any_region(text, region):
    parse_or_refuse(text, region)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_are_decoded_or_refused(data):
    try:
        text, encoding = decode_csv_bytes(data, "upload.csv")
    except InputError as exc:
        # A byte-order mark says UTF-16: its text must then be valid UTF-16.
        assert str(exc).startswith("upload.csv: line ") or str(exc) == (
            "upload.csv: invalid UTF-16 text"
        )
        return
    assert encoding in ("utf-8", "cp1252", "utf-16")
    parse_or_refuse(text)


def test_bytes_with_a_utf16_mark_are_read_as_utf16_or_refused_by_name():
    """What the fuzz found: a BOM, then bytes that are no UTF-16."""
    with pytest.raises(InputError, match="^upload.csv: invalid UTF-16 text$"):
        decode_csv_bytes(b"\xff\xfe\x00\xd8", "upload.csv")  # lone surrogate
    text, encoding = decode_csv_bytes(
        "phone\n+33612345678\n".encode("utf-16"), "upload.csv"
    )
    assert (text, encoding) == ("phone\n+33612345678\n", "utf-16")


def test_a_huge_field_and_many_columns_stay_an_answer():
    header = ";".join(["phone"] + [f"v{i}" for i in range(2000)])
    row = ";".join(["+33612345678"] + ["x" * 50] * 2000)
    parse_or_refuse(header + "\n" + row + "\n" + "+33612345679;" + "y" * 200_000)
