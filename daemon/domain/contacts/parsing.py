"""CSV files and JSON records (admin API) to contact rows; the rules are in
the package's docstring."""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

from daemon.domain.contacts.phones import check_region
from daemon.domain.contacts.phones import normalize_phone
from daemon.errors import InputError

# Header names accepted for the phone column (compared lower-cased); an
# exact "phone" wins over the others when a file has several.
PHONE_COLUMNS = (
    "phone",
    "phone_number",
    "telephone",
    "téléphone",
    "tel",
    "tél",
    "numero",
    "numéro",
    "mobile",
    "portable",
    "whatsapp",
)
NAME_COLUMN = "name"
# Header names accepted for the name column, the same way: an exact "name"
# wins, else the first of these from the left.
NAME_COLUMNS = (
    NAME_COLUMN,
    "nom",
    "full_name",
    "fullname",
    "full name",
    "nom complet",
    "prénom",
    "prenom",
    "first_name",
    "firstname",
    "first name",
)
SEPARATORS = (";", ",", "\t")
# Matches the Contact.name column (varchar(200), enforced by PostgreSQL).
MAX_NAME_LENGTH = 200
MAX_VARIABLE_LENGTH = 1000

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ContactRow:
    line: int
    phone: str
    name: str
    variables: dict[str, str]


@dataclass(frozen=True)
class ParsedCsv:
    rows: list[ContactRow]
    errors: list[tuple[int, str]]
    duplicates_merged: int
    # "utf-8", or "cp1252" when the file was not valid UTF-8.
    encoding: str = "utf-8"


@dataclass(frozen=True)
class ImportResult:
    created: int
    updated: int
    # One id per imported row, in row order.
    contact_ids: list[int] = field(default_factory=list)


def parse_csv_file(
    path: str | os.PathLike,
    region: str = "FR",
    progress: ProgressFn | None = None,
) -> ParsedCsv:
    """Read and parse a CSV file; progress(done_bytes, total_bytes) as it goes."""
    region = check_region(region)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    text, encoding = decode_csv_bytes(data, str(path))
    try:
        parsed = _parse(text, region, progress, total_bytes=len(data))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return replace(parsed, encoding=encoding)


def decode_csv_bytes(data: bytes, name: str = "CSV") -> tuple[str, str]:
    """(text, encoding): UTF-16 with its BOM, UTF-8 (BOM dropped), else Windows-1252."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # What Excel's "Unicode text" and some Windows tools write.
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise InputError(f"{name}: invalid UTF-16 text") from None
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        line = data[: utf8_error.start].count(b"\n") + 1
        raise InputError(
            f"{name}: line {line}: not UTF-8 nor Windows-1252 text "
            "(save the file as CSV UTF-8)"
        ) from None


def parse_csv_text(text: str, region: str = "FR") -> ParsedCsv:
    """Parse CSV text (see the module docstring for the rules)."""
    return _parse(text.removeprefix("\ufeff"), region, None, total_bytes=0)


def _parse(
    text: str, region: str, progress: ProgressFn | None, total_bytes: int
) -> ParsedCsv:
    region = check_region(region)
    counter = _LineCounter(text)
    header_line, header = _read_header(counter)
    columns = _Columns.from_header(header)
    rows = _MergedRows()
    errors: list[tuple[int, str]] = []
    reader = csv.reader(counter.lines(), delimiter=_sniff_separator(header_line))
    # csv.reader counts the physical lines it reads; the header's come first.
    offset = counter.line_number
    previous = 0
    try:
        for count, record in enumerate(reader, 1):
            line = offset + previous + 1
            previous = reader.line_num
            if progress and total_bytes and count % 5000 == 0:
                progress(counter.bytes_done(total_bytes), total_bytes)
            if not any(value.strip() for value in record):
                continue
            try:
                rows.add(columns.row(line, record, region))
            except InputError as exc:
                errors.append((line, str(exc)))
    except csv.Error as exc:
        line = offset + reader.line_num
        raise InputError(f"line {line}: malformed CSV: {exc}") from None
    if progress and total_bytes:
        progress(total_bytes, total_bytes)
    return ParsedCsv(rows.rows(), errors, rows.duplicates)


class _LineCounter:
    """Hands out the text's lines and remembers how far it has got."""

    def __init__(
        self,
        text: str = "",
        stream: io.TextIOBase | None = None,
        size: int = 0,
        length: int | None = None,
    ) -> None:
        self._stream = stream or io.StringIO(text, newline="")
        # The file's size in bytes, if known (for progress).
        self.size = size
        # Characters in all (a stream's: `length`, or its size in bytes,
        # close enough for a bar).
        if length is None:
            length = len(text) if stream is None else size
        self._length = max(length, 1)
        self._chars = 0
        self.line_number = 0

    def next_line(self) -> str | None:
        line = self._stream.readline()
        if not line:
            return None
        self._chars += len(line)
        self.line_number += 1
        return line

    def lines(self) -> Iterator[str]:
        while (line := self.next_line()) is not None:
            yield line

    def bytes_done(self, total: int) -> int:
        # Characters read, scaled to the file's size in bytes.
        return min(int(total * self._chars / self._length), total)


def _read_header(counter: _LineCounter) -> tuple[str, list[str]]:
    while (line := counter.next_line()) is not None:
        if line.strip():
            break
    else:
        raise InputError("empty file: a header row with a phone column is required")
    separator = _sniff_separator(line)
    # A header with a quoted line break is not worth supporting: it would
    # need the whole csv machinery just to find the columns.
    try:
        header = next(csv.reader([line], delimiter=separator))
    except csv.Error as exc:
        line = counter.line_number
        raise InputError(f"line {line}: malformed header: {exc}") from None
    return line, header


def _sniff_separator(header_line: str) -> str:
    counts = dict.fromkeys(SEPARATORS, 0)
    quoted = False
    for ch in header_line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(SEPARATORS, key=lambda sep: counts[sep])
    return best if counts[best] else ","


@dataclass(frozen=True)
class _Columns:
    """Where the phone, the name and the variables are in a row."""

    width: int
    phone: int
    name: int | None
    variables: tuple[tuple[int, str], ...]

    @classmethod
    def from_header(cls, header: list[str]) -> _Columns:
        names = [column.strip() for column in header]
        lowered = [name.lower() for name in names]
        seen: set[str] = set()
        for name in names:
            if name and name in seen:
                raise InputError(f"duplicate column {name!r} in the header")
            seen.add(name)
        phone = _find_column(lowered, PHONE_COLUMNS)
        if phone is None:
            raise InputError(
                "no phone column in the header (expected one named 'phone'; "
                f"got {', '.join(repr(n) for n in names if n)})"
            )
        name = _find_column(lowered, NAME_COLUMNS)
        variables = tuple(
            (i, column)
            for i, column in enumerate(names)
            if column and i not in (phone, name)
        )
        return cls(len(names), phone, name, variables)

    def row(self, line: int, record: list[str], region: str) -> ContactRow:
        self._check_width(record)
        phone = normalize_phone(record[self.phone], region)
        return self._make(line, record, phone)

    def checked_row(self, line: int, record: list[str], ok: bool, phone: str):
        """row() with the number normalised already: (ok, E.164 or why not)."""
        self._check_width(record)
        if not ok:
            raise InputError(phone)
        return self._make(line, record, phone)

    def _check_width(self, record: list[str]) -> None:
        if len(record) < self.width:
            raise InputError(
                f"expected {self.width} fields, got {len(record)} "
                "(check the separator and quotes)"
            )
        if len(record) > self.width and any(v.strip() for v in record[self.width :]):
            raise InputError(
                f"expected {self.width} fields, got {len(record)} "
                "(quote values that contain the separator)"
            )

    def _make(self, line: int, record: list[str], phone: str) -> ContactRow:
        name = record[self.name].strip() if self.name is not None else ""
        variables = {
            column: record[i].strip()
            for i, column in self.variables
            if record[i].strip()
        }
        return make_row(line, phone, name, variables)


def _find_column(lowered: list[str], aliases: tuple[str, ...]) -> int | None:
    """The exact first alias, else the leftmost column named by any alias."""
    if aliases[0] in lowered:
        return lowered.index(aliases[0])
    for i, column in enumerate(lowered):
        if column in aliases:
            return i
    return None


def header_variables(text: str) -> dict[str, str]:
    """{template variable: its column's header} a CSV provides, from the start
    of its text: phone, name (if a column holds it), every other column."""
    _, header = _read_header(_LineCounter(text))
    columns = _Columns.from_header(header)
    names = [column.strip() for column in header]
    out = {"phone": names[columns.phone]}
    if columns.name is not None:
        out["name"] = names[columns.name]
    out.update((column, column) for _, column in columns.variables)
    return out


def make_row(line: int, phone: str, name: str, variables: dict[str, str]) -> ContactRow:
    """A ContactRow after the length checks the database needs."""
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"name longer than {MAX_NAME_LENGTH} characters")
    for key, value in variables.items():
        if len(value) > MAX_VARIABLE_LENGTH:
            raise InputError(
                f"value of {key!r} longer than {MAX_VARIABLE_LENGTH} characters"
            )
    return ContactRow(line, phone, name, variables)


class _MergedRows:
    """Rows keyed by phone: a number seen again updates the first row."""

    def __init__(self) -> None:
        self._by_phone: dict[str, ContactRow] = {}
        self.duplicates = 0

    def add(self, row: ContactRow) -> None:
        first = self._by_phone.get(row.phone)
        if first is None:
            self._by_phone[row.phone] = row
            return
        self.duplicates += 1
        self._by_phone[row.phone] = ContactRow(
            first.line,
            row.phone,
            row.name or first.name,
            {**first.variables, **row.variables},
        )

    def rows(self) -> list[ContactRow]:
        return list(self._by_phone.values())


def parse_records(records: list[dict], region: str = "FR") -> ParsedCsv:
    """Rows from API records [{phone, name, ...variables}].

    The same rules as a CSV, except that the number attached to each row and
    error is the record's 0-based index in the list (as in a JSON pointer).
    """
    region = check_region(region)
    if not isinstance(records, list):
        raise InputError("contacts: must be a list of objects")
    rows = _MergedRows()
    errors: list[tuple[int, str]] = []
    for index, record in enumerate(records):
        try:
            rows.add(_record_row(index, record, region))
        except InputError as exc:
            errors.append((index, str(exc)))
    return ParsedCsv(rows.rows(), errors, rows.duplicates)


def _record_row(index: int, record, region: str) -> ContactRow:
    if not isinstance(record, dict):
        raise InputError("must be an object with a 'phone' key")
    values = {}
    for key, value in record.items():
        text = _scalar_text(key, value)
        if text:
            values[str(key).strip()] = text
    if "phone" not in values:
        raise InputError("missing phone number")
    phone = normalize_phone(values.pop("phone"), region)
    name = values.pop(NAME_COLUMN, "")
    return make_row(index, phone, name, values)


def _scalar_text(key, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    raise InputError(f"field {key!r} must be a string or a number")
