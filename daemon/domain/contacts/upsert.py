"""Contact rows to the database: one upsert a chunk, empty cells never
erasing a stored variable."""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _quote

from daemon.domain.contacts.parsing import ContactRow
from daemon.domain.contacts.parsing import ImportResult
from daemon.domain.contacts.parsing import ProgressFn
from daemon.store.db import is_postgres
from daemon.store.models import Contact
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow

# Rows per statement: the phone IN lists bind one parameter per row, well
# under SQLite's 32766 and PostgreSQL's 65535.
CHUNK_ROWS = 2000
# The PostgreSQL path's staging table: temporary (one per connection, so
# concurrent imports do not meet), dropped when the import's transaction ends.
STAGE_TABLE = "contact_import_stage"
_encoder = json.JSONEncoder(ensure_ascii=False)


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
            encoded = [encoded_row(row) for row in chunk]
            existing, chunk_ids = upsert_rows(encoded, with_ids=True)
            updated += len(existing)
            created += len(chunk) - len(existing)
            ids.update(chunk_ids)
            if progress:
                progress(start + len(chunk), len(rows))
    return ImportResult(created, updated, [ids[row.phone] for row in rows])


# (phone, name, variables as JSON text): a row as the upsert takes it, so
# that the JSON is written where the row is made (a worker process).
EncodedRow = tuple[str, str, str]


def encoded_row(row: ContactRow) -> EncodedRow:
    return row.phone, row.name, _encode_variables(row.variables)


def upsert_rows(
    rows: list[EncodedRow], with_ids: bool = False
) -> tuple[set[str], dict[str, int]]:
    """Upsert up to CHUNK_ROWS rows (more on PostgreSQL) merged with what is
    stored; (the phones that were stored already, {phone: id} if with_ids).

    Run it inside a transaction (import_rows and the streamed import do);
    on PostgreSQL the staging table lives until that transaction ends.
    """
    phones = [row[0] for row in rows]
    existing = _existing(phones)
    params = _merged(rows, existing)
    if is_postgres() and len(set(phones)) == len(phones):
        ids = _upsert_staged(params, with_ids)
    else:
        # NOTE: one prepared statement run by executemany, because peewee
        # spends ~90 % of a 100k-row import building insert_many's SQL text.
        now = utcnow()
        database.cursor().executemany(
            _upsert_sql(), [(*row, WaStatus.UNKNOWN, now) for row in params]
        )
        ids = _ids(phones) if with_ids else {}
    return set(existing), ids


def _existing(phones: list[str]) -> dict[str, tuple[str, dict]]:
    rows = _by_phone(("phone", "name", "variables"), phones)
    parse = Contact.variables.python_value
    return {phone: (name, parse(variables) or {}) for phone, name, variables in rows}


def _merged(
    rows: list[EncodedRow], existing: dict[str, tuple[str, dict]]
) -> list[EncodedRow]:
    """The rows of numbers stored already with the stored name unless the row
    has one, and the stored variables updated with the row's."""
    params = []
    for phone, name, variables in rows:
        old = existing.get(phone)
        if old is not None:
            name = name or old[0]
            variables = _encode_variables({**old[1], **json.loads(variables)})
        params.append((phone, name, variables))
    return params


def _encode_variables(variables: dict) -> str:
    """What Contact.variables.db_value writes (json.dumps(variables,
    ensure_ascii=False)) in half the time: json.dumps builds an encoder a
    call, 2 s of the main process's time at a million rows."""
    try:
        # The text json.dumps writes for a dict of strings (its default
        # separators, the same C function for the strings).
        return (
            "{"
            + ", ".join([f"{_quote(k)}: {_quote(v)}" for k, v in variables.items()])
            + "}"
        )
    except TypeError:  # a value or key that is not a string
        return _encoder.encode(variables)


def _upsert_staged(params: list[tuple[str, str, str]], with_ids: bool) -> dict:
    """PostgreSQL: COPY the chunk into a temporary table, then one
    INSERT ... SELECT ... ON CONFLICT; {phone: id} if with_ids.

    Before this, the chunk went as five array parameters of one `unnest`
    statement: psycopg quotes each element of a text array in Python, and
    that (with the IN list of _existing) made the cluster import of a million
    rows take 64 s. COPY rows are formatted by psycopg's C code.
    """
    meta = Contact._meta
    stage = STAGE_TABLE
    cursor = database.cursor()
    # No parameters: one simple-protocol round trip for both statements. ON
    # COMMIT DROP is why the caller's transaction is needed (in autocommit
    # the table would be gone before the COPY, which would fail).
    cursor.execute(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} "
        "(phone text, name text, variables text) ON COMMIT DROP; "
        f"TRUNCATE {stage}"
    )
    with cursor.copy(f"COPY {stage} (phone, name, variables) FROM STDIN") as copy:
        for row in params:
            copy.write_row(row)
    # The merge is done above, so the conflict clause only copies the new
    # values in; it also covers a contact inserted by someone else meanwhile
    # (as the SQLite statement does).
    returning = f" RETURNING {_column('phone')}, {_column('id')}"
    cursor.execute(
        f'INSERT INTO "{meta.table_name}" ({_upsert_columns()}) '
        f"SELECT phone, name, variables, %s, %s::timestamp FROM {stage} "
        f"{_conflict_clause()}{returning if with_ids else ''}",
        (WaStatus.UNKNOWN, utcnow()),
    )
    return dict(cursor.fetchall()) if with_ids else {}


def _column(name: str) -> str:
    return Contact._meta.fields[name].column_name


def _upsert_columns() -> str:
    names = ("phone", "name", "variables", "wa_status", "created_at")
    return ", ".join(_column(name) for name in names)


def _conflict_clause() -> str:
    phone, name, variables = _column("phone"), _column("name"), _column("variables")
    return (
        f"ON CONFLICT ({phone}) DO UPDATE SET "
        f"{name} = EXCLUDED.{name}, {variables} = EXCLUDED.{variables}"
    )


def _upsert_sql() -> str:
    # SQLite >= 3.24 and PostgreSQL share this syntax.
    placeholders = ", ".join([database.param] * 5)
    meta = Contact._meta
    return (
        f'INSERT INTO "{meta.table_name}" ({_upsert_columns()}) '
        f"VALUES ({placeholders}) {_conflict_clause()}"
    )


def _ids(phones: list[str]) -> dict[str, int]:
    return dict(_by_phone(("phone", "id"), phones))


def _by_phone(fields: tuple[str, ...], phones: list[str]) -> list[tuple]:
    # Raw SQL for the same reason as the upsert: peewee's per-value overhead
    # would double the import time.
    meta = Contact._meta
    columns = ", ".join(meta.fields[name].column_name for name in fields)
    sql = f'SELECT {columns} FROM "{meta.table_name}" WHERE {_column("phone")} '
    if is_postgres():
        # One array parameter in binary: no 10,000-placeholder query text for
        # psycopg to parse, no text quoting of each element.
        return list(database.cursor().execute(sql + "= ANY(%b)", (phones,)))
    placeholders = ", ".join([database.param] * len(phones))
    return list(database.execute_sql(sql + f"IN ({placeholders})", phones).fetchall())
