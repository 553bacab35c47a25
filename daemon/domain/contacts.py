"""Contacts in: phone numbers to E.164, CSV files and JSON records to rows, rows
to the database.

CSV rules (`parse_csv_text`):

- The first non-empty line is the header. One column must be the phone number:
  ``phone`` (any case) or one of the aliases in `PHONE_COLUMNS`. ``name`` (any
  case) is the contact's name. Every other column is a template variable,
  named by its header stripped of surrounding spaces, case kept as written
  (``{City}`` and ``{city}`` are different variables). Columns with an empty
  header are ignored; two columns with the same name are a fatal error.
- The separator is whichever of ``;``, ``,`` and tab appears most often in the
  header line, outside quotes (``,`` when none does). Fields may be quoted,
  with separators and line breaks inside.
- A UTF-8 BOM is dropped. A file that is not UTF-8 is read as Windows-1252,
  the encoding French Excel writes, and `ParsedCsv.encoding` says so (the CLI
  prints it); bytes invalid in both are a fatal error.
- Line numbers are physical file lines, header included (header = line 1 when
  the file starts with it). A quoted field spanning lines reports the line
  where its row starts.
- Empty lines, and lines whose fields are all blank (Excel's ``;;;``), are
  skipped silently.
- A row with fewer fields than the header, or more (extra fields that are
  not blank), is rejected, as is a row with a missing or invalid number.
  Rejected rows are collected in `ParsedCsv.errors`; only a file that cannot
  be read as CSV at all (no header or phone column, malformed quoting, NUL
  bytes) raises InputError.
- A number appearing twice (in any format) is one contact, kept at the line
  of its first row: the later rows' non-empty values win, field by field,
  and `ParsedCsv.duplicates_merged` counts the extra rows.
- Empty cells are not variables: a contact whose ``city`` cell is empty lacks
  ``{city}``, and re-importing it does not erase a ``city`` stored before.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import os
import re
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

import phonenumbers
from phonenumbers import NumberParseException
from phonenumbers import PhoneMetadata
from phonenumbers import ValidationResult
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from daemon.errors import InputError
from daemon.store.db import is_postgres
from daemon.store.models import Contact
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow

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
SEPARATORS = (";", ",", "\t")
# Matches the Contact.name column (varchar(200), enforced by PostgreSQL).
MAX_NAME_LENGTH = 200
MAX_VARIABLE_LENGTH = 1000
# Rows per statement: the phone IN lists bind one parameter per row, well
# under SQLite's 32766 and PostgreSQL's 65535.
CHUNK_ROWS = 2000

_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}
_LENGTH_REASONS = {
    ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    ValidationResult.TOO_SHORT: "too short",
    ValidationResult.TOO_LONG: "too long",
    ValidationResult.INVALID_LENGTH: "wrong length",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "too short (local number only)",
}

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


def normalize_phone(raw: str, region: str = "FR") -> str:
    """E.164 ("+33612345678") from any usual way of writing a number."""
    region = check_region(region)
    text = (raw or "").strip()
    if not text:
        raise InputError("missing phone number")
    fast = _fast_e164(text)
    if fast is not None:
        return fast
    if any(ch.isalpha() for ch in text):
        raise InputError(f"invalid phone number {text!r}: contains letters")
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        reason = _PARSE_REASONS.get(exc.error_type, "not a phone number")
        raise InputError(f"invalid phone number {text!r}: {reason}") from None
    if number.extension:
        raise InputError(f"invalid phone number {text!r}: has an extension")
    if not phonenumbers.is_valid_number(number):
        raise InputError(f"invalid phone number {text!r}: {_invalid_reason(number)}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# "+" then digits, with spaces, dots or dashes between them: the E.164 that
# most files hold (written compactly or grouped).
_E164_LIKE = re.compile(r"\+[1-9][0-9]{1,14}")
_SEPARATORS = str.maketrans("", "", " .-")


def _fast_e164(text: str) -> str | None:
    """The number of an international "+..." string, or None: ask the parser.

    phonenumbers.parse costs two thirds of a number's time, mostly in regular
    expressions a "+digits" string does not need. Here the country code is
    read off the digits and the number built directly; it still goes through
    is_valid_number, so what it accepts is what the parser accepts. Anything
    unusual (no such country code, a national number that starts with 0 or
    with what the country's national prefix may look like, an invalid
    number, which needs the parser's reason) returns None and takes the full
    parser.
    """
    compact = text.translate(_SEPARATORS)
    if not _E164_LIKE.fullmatch(compact):
        return None
    digits = compact[1:]
    for size in (1, 2, 3):
        country_code = int(digits[:size])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[size:]
    if len(national) < 2 or national[0] == "0":
        return None  # Italian-style leading zeros, national prefixes
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix and _prefix_pattern(prefix).match(national):
        return None  # the parser might strip a national prefix from it
    number = phonenumbers.PhoneNumber(
        country_code=country_code, national_number=int(national)
    )
    if not phonenumbers.is_valid_number(number):
        return None
    return "+" + digits


@functools.lru_cache(maxsize=512)
def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(prefix)


def _invalid_reason(number: phonenumbers.PhoneNumber) -> str:
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible != ValidationResult.IS_POSSIBLE:
        return _LENGTH_REASONS.get(possible, "impossible number")
    where = phonenumbers.region_code_for_number(number) or "its country code"
    return f"not a valid {where} number"


def check_region(region: str) -> str:
    """The upper-cased ISO region code, if phonenumbers knows it."""
    code = (region or "").strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise InputError(f"unknown region {region!r} (expected e.g. FR, BE, US)")
    return code


# --- CSV ---------------------------------------------------------------------


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
    """(text, encoding): UTF-8 (BOM dropped), else Windows-1252."""
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
        self, text: str = "", stream: io.TextIOBase | None = None, size: int = 0
    ) -> None:
        self._stream = stream or io.StringIO(text, newline="")
        # The file's size in bytes, if known (for progress).
        self.size = size
        # Characters in all (a stream's: its size, close enough for a bar).
        self._length = max(len(text) if stream is None else size, 1)
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
        phone = _find_phone_column(lowered)
        if phone is None:
            raise InputError(
                "no phone column in the header (expected one named 'phone'; "
                f"got {', '.join(repr(n) for n in names if n)})"
            )
        name = lowered.index(NAME_COLUMN) if NAME_COLUMN in lowered else None
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


def _find_phone_column(lowered: list[str]) -> int | None:
    if "phone" in lowered:
        return lowered.index("phone")
    for i, column in enumerate(lowered):
        if column in PHONE_COLUMNS:
            return i
    return None


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


# --- JSON records (admin API) ---------------------------------------------------


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


# --- database -------------------------------------------------------------------


def import_rows(
    rows: list[ContactRow], progress: ProgressFn | None = None
) -> ImportResult:
    """Upsert rows by phone in one transaction; progress(done_rows, total_rows).

    A contact already known keeps its id, opt-out and WhatsApp status; its
    name is replaced when the row has one and its variables are merged (the
    row's values win).
    """
    if not rows:
        return ImportResult(0, 0, [])
    created = updated = 0
    ids: dict[str, int] = {}
    with database.atomic():
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            phones = [row.phone for row in chunk]
            existing = _existing(phones)
            updated += len(existing)
            created += len(chunk) - len(existing)
            _upsert(chunk, existing)
            ids.update(_ids(phones))
            if progress:
                progress(start + len(chunk), len(rows))
    return ImportResult(created, updated, [ids[row.phone] for row in rows])


def _existing(phones: list[str]) -> dict[str, tuple[str, dict]]:
    rows = _by_phone(("phone", "name", "variables"), phones)
    parse = Contact.variables.python_value
    return {phone: (name, parse(variables) or {}) for phone, name, variables in rows}


def _upsert(chunk: list[ContactRow], existing: dict[str, tuple[str, dict]]) -> None:
    now = utcnow()
    params = []
    for row in chunk:
        old_name, old_variables = existing.get(row.phone, ("", {}))
        variables = {**old_variables, **row.variables}
        params.append(
            (
                row.phone,
                row.name or old_name,
                Contact.variables.db_value(variables),
                WaStatus.UNKNOWN,
                now,
            )
        )
    # NOTE: one prepared statement run by executemany, because peewee spends
    # ~90 % of a 100k-row import building insert_many's SQL text. The merge
    # is done above, so the conflict clause only copies the new values in; it
    # also covers a contact inserted by someone else meanwhile. SQLite >= 3.24
    # and PostgreSQL share this syntax.
    if is_postgres() and len({row[0] for row in params}) == len(params):
        # One statement over arrays: executemany makes a round trip of work
        # per row (a million-row import took 72 s, over its 60 s target).
        columns = [list(column) for column in zip(*params, strict=True)]
        database.execute_sql(_upsert_sql(unnest=True), columns)
        return
    database.cursor().executemany(_upsert_sql(), params)


def _upsert_sql(unnest: bool = False) -> str:
    meta = Contact._meta
    columns = [
        meta.fields[name].column_name
        for name in ("phone", "name", "variables", "wa_status", "created_at")
    ]
    placeholders = ", ".join([database.param] * len(columns))
    source = f"VALUES ({placeholders}) "
    if unnest:
        arrays = "%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamp[]"
        source = f"SELECT * FROM unnest({arrays}) "
    return (
        f'INSERT INTO "{meta.table_name}" ({", ".join(columns)}) '
        f"{source}"
        f"ON CONFLICT ({columns[0]}) DO UPDATE SET "
        f"{columns[1]} = EXCLUDED.{columns[1]}, {columns[2]} = EXCLUDED.{columns[2]}"
    )


def _ids(phones: list[str]) -> dict[str, int]:
    return dict(_by_phone(("phone", "id"), phones))


def _by_phone(fields: tuple[str, ...], phones: list[str]) -> list[tuple]:
    # Raw SQL for the same reason as _upsert: peewee's per-value overhead
    # would double the import time.
    meta = Contact._meta
    columns = ", ".join(meta.fields[name].column_name for name in fields)
    placeholders = ", ".join([database.param] * len(phones))
    sql = (
        f'SELECT {columns} FROM "{meta.table_name}" '
        f"WHERE {meta.fields['phone'].column_name} IN ({placeholders})"
    )
    return list(database.execute_sql(sql, phones).fetchall())


# --- big files: streamed, numbers normalised in several processes ---------------

# Records per unit of work: a worker normalises this many numbers at a time,
# and the database gets them as one upsert (in the import's one transaction).
STREAM_CHUNK_ROWS = 10_000
# Below this size a file is not worth starting processes for.
PARALLEL_MIN_BYTES = 4_000_000


def import_csv_file(
    path: str | os.PathLike,
    region: str = "FR",
    *,
    processes: int | None = None,
    chunk_rows: int = STREAM_CHUNK_ROWS,
    with_ids: bool = False,
    check_progress: ProgressFn | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ParsedCsv, ImportResult]:
    """parse_csv_file + import_rows for files of millions of rows.

    The same rules and the same database result, but the rows are never all
    in memory: the file is read in chunks of `chunk_rows` records, their
    numbers normalised by `processes` worker processes (default: one per CPU,
    up to 4, for files above PARALLEL_MIN_BYTES), and each chunk upserted as
    soon as it is ready, in one transaction for the whole file. A number seen
    again later in the file updates the contact made by its first row, as in
    the merged import. The ParsedCsv has no rows (only the errors and counts)
    and the ImportResult no contact ids unless `with_ids` (one query more
    per chunk; a list of the size of the file).

    check_progress(done_bytes, total_bytes) follows the encoding check (one
    read of the file), progress(done_bytes, total_bytes) the import.
    """
    region = check_region(region)
    try:
        size = os.stat(path).st_size
        utf8 = _is_utf8(path, check_progress, size)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if processes is None:
        processes = min(os.cpu_count() or 1, 4) if size > PARALLEL_MIN_BYTES else 1
    processes = max(processes, 1)
    try:
        if utf8:
            # Read as it goes: the text of a million rows is 100 MB in memory.
            with open(path, encoding="utf-8-sig", newline="") as stream:
                counter = _LineCounter(stream=stream, size=size)
                parsed, result = _import_stream(
                    counter, region, processes, chunk_rows, with_ids, progress
                )
            return parsed, result
        with open(path, "rb") as f:
            text, encoding = decode_csv_bytes(f.read(), str(path))
        parsed, result = _import_stream(
            _LineCounter(text, size=size),
            region,
            processes,
            chunk_rows,
            with_ids,
            progress,
        )
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return replace(parsed, encoding=encoding), result


def import_csv_text(
    text: str, region: str = "FR", *, with_ids: bool = False
) -> tuple[ParsedCsv, ImportResult]:
    """import_csv_file for CSV text already in memory (an API request body).

    In this process (no worker processes), chunk by chunk: the text stays,
    but the rows are never all built (they take several times its size).
    """
    region = check_region(region)
    counter = _LineCounter(text.removeprefix("\ufeff"))
    return _import_stream(counter, region, 1, STREAM_CHUNK_ROWS, with_ids, None)


def _is_utf8(
    path: str | os.PathLike, progress: ProgressFn | None = None, size: int = 0
) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        try:
            while block := f.read(1 << 20):
                decoder.decode(block)
                done += len(block)
                if progress:
                    progress(min(done, size), size)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _import_stream(
    counter: _LineCounter,
    region: str,
    processes: int,
    chunk_rows: int,
    with_ids: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[ParsedCsv, ImportResult]:
    header_line, header = _read_header(counter)
    columns = _Columns.from_header(header)
    chunks = _record_chunks(counter, header_line, chunk_rows)
    if progress and counter.size:
        chunks = _reporting(chunks, counter, progress)
    state = _StreamState(with_ids)
    with database.atomic():
        if processes == 1:
            for chunk in chunks:
                cells = _phone_cells(chunk, columns)
                state.add(chunk, normalize_many(cells, region), columns)
        else:
            _run_parallel(chunks, region, processes, columns, state)
    if progress and counter.size:
        progress(counter.size, counter.size)
    parsed = ParsedCsv([], sorted(state.errors), state.duplicates)
    return parsed, ImportResult(state.created, state.updated, state.ids)


def _reporting(chunks, counter: _LineCounter, progress: ProgressFn):
    # Read ahead of the import by at most the parallel window: close enough.
    for chunk in chunks:
        yield chunk
        progress(counter.bytes_done(counter.size), counter.size)


def _record_chunks(counter: _LineCounter, header_line: str, chunk_rows: int):
    """Lists of (line, record), `chunk_rows` non-blank records each."""
    reader = csv.reader(counter.lines(), delimiter=_sniff_separator(header_line))
    offset = counter.line_number
    previous = 0
    chunk: list[tuple[int, list[str]]] = []
    try:
        for record in reader:
            line = offset + previous + 1
            previous = reader.line_num
            if not any(value.strip() for value in record):
                continue
            chunk.append((line, record))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    except csv.Error as exc:
        line = offset + reader.line_num
        raise InputError(f"line {line}: malformed CSV: {exc}") from None
    if chunk:
        yield chunk


def normalize_many(raws: list[str | None], region: str) -> list[tuple[bool, str]]:
    """(True, E.164) or (False, why) per number; what a worker process runs."""
    out = []
    for raw in raws:
        try:
            out.append((True, normalize_phone(raw or "", region)))
        except InputError as exc:
            out.append((False, str(exc)))
    return out


def _phone_cells(chunk, columns: _Columns) -> list[str]:
    return [r[columns.phone] if len(r) > columns.phone else "" for _, r in chunk]


def _run_parallel(chunks, region, processes, columns, state) -> None:
    import concurrent.futures
    import multiprocessing

    # forkserver: workers do not inherit this process's memory (the file).
    context = multiprocessing.get_context("forkserver")
    window = processes * 2
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        pending: list = []
        for chunk in chunks:
            cells = _phone_cells(chunk, columns)
            pending.append((chunk, pool.submit(normalize_many, cells, region)))
            if len(pending) >= window:
                done_chunk, future = pending.pop(0)
                state.add(done_chunk, future.result(), columns)
        for done_chunk, future in pending:
            state.add(done_chunk, future.result(), columns)


class _StreamState:
    """Counts across chunks, and each chunk merged and upserted."""

    def __init__(self, with_ids: bool = False) -> None:
        self.with_ids = with_ids
        # One contact id per distinct number, first seen first (with_ids).
        self.ids: list[int] = []
        # Numbers seen so far, as integers (a third of the memory of strings).
        self.seen: set[int] = set()
        self.errors: list[tuple[int, str]] = []
        self.duplicates = self.created = self.updated = 0

    def add(self, chunk, phones: list[tuple[bool, str]], columns: _Columns) -> None:
        rows = _MergedRows()
        first: list[str] = []
        for (line, record), (ok, value) in zip(chunk, phones, strict=True):
            try:
                row = columns.checked_row(line, record, ok, value)
            except InputError as exc:
                self.errors.append((line, str(exc)))
                continue
            key = int(row.phone[1:])
            if key in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(key)
                first.append(row.phone)
            rows.add(row)
        merged = rows.rows()
        if not merged:
            return
        existing = _existing([row.phone for row in merged])
        known = sum(1 for phone in first if phone in existing)
        self.updated += known
        self.created += len(first) - known
        _upsert(merged, existing)
        if self.with_ids and first:
            ids = _ids(first)
            self.ids.extend(ids[phone] for phone in first)
