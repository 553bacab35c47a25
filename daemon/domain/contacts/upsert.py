"""Contact rows to the database: one upsert a chunk, empty cells never
erasing a stored variable."""

from __future__ import annotations

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
