"""Big files: streamed, each chunk's rows built (numbers normalised, rows
checked and merged) in several processes, one upsert a chunk in the
import's one transaction."""

from __future__ import annotations

import codecs
import csv
import os
from dataclasses import replace

from daemon.domain.contacts.parsing import ImportResult
from daemon.domain.contacts.parsing import ParsedCsv
from daemon.domain.contacts.parsing import ProgressFn
from daemon.domain.contacts.parsing import _Columns
from daemon.domain.contacts.parsing import _LineCounter
from daemon.domain.contacts.parsing import _MergedRows
from daemon.domain.contacts.parsing import _read_header
from daemon.domain.contacts.parsing import _sniff_separator
from daemon.domain.contacts.phones import check_region
from daemon.domain.contacts.phones import normalize_phone
from daemon.domain.contacts.upsert import EncodedRow
from daemon.domain.contacts.upsert import encoded_row
from daemon.domain.contacts.upsert import upsert_rows
from daemon.errors import InputError
from daemon.store.models import database

# Records per unit of work: a worker builds this many rows at a time, and the
# database gets them as one upsert (in the import's one transaction).
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
    rows built by `processes` worker processes (default: one per CPU,
    up to 4, for files above PARALLEL_MIN_BYTES), and each chunk upserted as
    soon as it is ready, in one transaction for the whole file. A number seen
    again later in the file updates the contact made by its first row, as in
    the merged import. The ParsedCsv has no rows (only the errors and counts)
    and the ImportResult no contact ids unless `with_ids` (a list of the
    size of the file; on SQLite one query more per chunk).

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
        encoding = "utf-8" if utf8 else _legacy_encoding(path)
        # Read as it goes, whatever the encoding: the text of a million rows
        # is 100 MB in memory (200 MB for a UTF-16 file read whole).
        with open(path, encoding=_READ_AS[encoding], newline="") as stream:
            # Characters in all, for the progress bar: UTF-16 has two bytes each.
            chars = size // 2 if encoding == "utf-16" else size
            counter = _LineCounter(stream=stream, size=size, length=chars)
            parsed, result = _import_stream(
                counter, region, processes, chunk_rows, with_ids, progress
            )
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return replace(parsed, encoding=encoding), result


# How each encoding import_csv_file reports is read (a UTF-8 BOM is dropped).
_READ_AS = {"utf-8": "utf-8-sig", "utf-16": "utf-16", "cp1252": "cp1252"}


def _legacy_encoding(path: str | os.PathLike) -> str:
    """A file that is not UTF-8: UTF-16 with its BOM, else Windows-1252, as
    `decode_csv_bytes` reads one in memory; checked to decode whole first
    (an error past the first chunk would come after rows were built)."""
    with open(path, "rb") as f:
        encoding = "utf-16" if f.read(2) in _UTF16_BOMS else "cp1252"
        f.seek(0)
        decoder = codecs.getincrementaldecoder(encoding)()
        line = 1
        try:
            while block := f.read(1 << 20):
                decoder.decode(block)
                line += block.count(b"\n")
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            if encoding == "utf-16":
                raise InputError("invalid UTF-16 text") from None
            line += block[: exc.start].count(b"\n")
            raise InputError(
                f"line {line}: not UTF-8 nor Windows-1252 text "
                "(save the file as CSV UTF-8)"
            ) from None
    return encoding


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


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
                state.add(*build_chunk(chunk, columns, region))
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
            # Blank record (Excel's ;;;): the same test as any(v.strip()),
            # without a generator a record.
            if not "".join(record).strip():
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


def build_chunk(
    chunk: list[tuple[int, list[str]]], columns: _Columns, region: str
) -> tuple[list[EncodedRow], list[tuple[int, str]], int]:
    """Records to rows: (the rows, a number seen twice merged into its first
    row, their variables as JSON text; the rejected (line, why); how many
    rows were merged). What a worker process runs: the import's one process
    (the database's) is left the file's reading and the upserts.
    """
    cells = [r[columns.phone] if len(r) > columns.phone else "" for _, r in chunk]
    rows = _MergedRows()
    errors: list[tuple[int, str]] = []
    for (line, record), (ok, value) in zip(
        chunk, normalize_many(cells, region), strict=True
    ):
        try:
            rows.add(columns.checked_row(line, record, ok, value))
        except InputError as exc:
            errors.append((line, str(exc)))
    merged = [encoded_row(row) for row in rows.rows()]
    return merged, errors, rows.duplicates


def _run_parallel(chunks, region, processes, columns, state) -> None:
    import concurrent.futures
    import multiprocessing

    # forkserver: workers do not inherit this process's memory (the file).
    context = multiprocessing.get_context("forkserver")
    window = processes * 2
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        pending: list = []
        for chunk in chunks:
            pending.append(pool.submit(build_chunk, chunk, columns, region))
            if len(pending) >= window:
                state.add(*pending.pop(0).result())
        for future in pending:
            state.add(*future.result())


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

    def add(
        self, rows: list[EncodedRow], errors: list[tuple[int, str]], merged: int
    ) -> None:
        """Upsert a chunk's rows (from build_chunk)."""
        self.errors.extend(errors)
        self.duplicates += merged
        # A number seen in an earlier chunk: a duplicate too, and an update
        # of the contact its first row made.
        first: list[str] = []
        for phone, _, _ in rows:
            key = int(phone[1:])
            if key in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(key)
                first.append(phone)
        if not rows:
            return
        existing, ids = upsert_rows(rows, self.with_ids and bool(first))
        known = sum(1 for phone in first if phone in existing)
        self.updated += known
        self.created += len(first) - known
        if self.with_ids:
            self.ids.extend(ids[phone] for phone in first)
