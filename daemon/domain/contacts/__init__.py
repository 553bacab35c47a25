"""Contacts in: phone numbers to E.164, CSV files and JSON records to rows, rows
to the database.

CSV rules (`parse_csv_text`):

- The first non-empty line is the header. One column must be the phone number:
  ``phone`` (any case) or one of the aliases in `PHONE_COLUMNS`. ``name`` (any
  case) or one of the aliases in `NAME_COLUMNS` (``nom``, ``prénom``, ...) is
  the contact's name (``{name}``). Every other column is a template variable,
  named by its header stripped of surrounding spaces, case kept as written
  (``{City}`` and ``{city}`` are different variables). Columns with an empty
  header are ignored; two columns with the same name are a fatal error.
- The separator is whichever of ``;``, ``,`` and tab appears most often in the
  header line, outside quotes (``,`` when none does). Fields may be quoted,
  with separators and line breaks inside.
- A UTF-8 BOM is dropped; a file that starts with a UTF-16 BOM is read as
  UTF-16. A file that is not UTF-8 is read as Windows-1252,
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

The package, each module importing only those above it: phones (E.164),
parsing (CSV and JSON records to rows), upsert (rows to the database),
streaming (big files in several processes).
"""

from daemon.domain.contacts.parsing import MAX_NAME_LENGTH
from daemon.domain.contacts.parsing import MAX_VARIABLE_LENGTH
from daemon.domain.contacts.parsing import NAME_COLUMN
from daemon.domain.contacts.parsing import NAME_COLUMNS
from daemon.domain.contacts.parsing import PHONE_COLUMNS
from daemon.domain.contacts.parsing import SEPARATORS
from daemon.domain.contacts.parsing import ContactRow
from daemon.domain.contacts.parsing import ImportResult
from daemon.domain.contacts.parsing import ParsedCsv
from daemon.domain.contacts.parsing import ProgressFn
from daemon.domain.contacts.parsing import decode_csv_bytes
from daemon.domain.contacts.parsing import header_variables
from daemon.domain.contacts.parsing import make_row
from daemon.domain.contacts.parsing import parse_csv_file
from daemon.domain.contacts.parsing import parse_csv_text
from daemon.domain.contacts.parsing import parse_records
from daemon.domain.contacts.phones import check_region
from daemon.domain.contacts.phones import normalize_phone
from daemon.domain.contacts.streaming import PARALLEL_MIN_BYTES
from daemon.domain.contacts.streaming import STREAM_CHUNK_ROWS
from daemon.domain.contacts.streaming import import_csv_file
from daemon.domain.contacts.streaming import import_csv_text
from daemon.domain.contacts.streaming import normalize_many
from daemon.domain.contacts.upsert import CHUNK_ROWS
from daemon.domain.contacts.upsert import import_rows

__all__ = [
    "normalize_phone",
    "check_region",
    "PHONE_COLUMNS",
    "NAME_COLUMN",
    "NAME_COLUMNS",
    "SEPARATORS",
    "MAX_NAME_LENGTH",
    "MAX_VARIABLE_LENGTH",
    "ProgressFn",
    "ContactRow",
    "ParsedCsv",
    "ImportResult",
    "parse_csv_file",
    "decode_csv_bytes",
    "header_variables",
    "parse_csv_text",
    "make_row",
    "parse_records",
    "CHUNK_ROWS",
    "import_rows",
    "STREAM_CHUNK_ROWS",
    "PARALLEL_MIN_BYTES",
    "import_csv_file",
    "import_csv_text",
    "normalize_many",
]
