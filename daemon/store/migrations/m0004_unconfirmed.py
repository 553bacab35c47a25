"""Unconfirmed sends: `message.unconfirmed_at` and `message.resends`, and
`message.status` wide enough for "unconfirmed" (11 characters; it was
VARCHAR(10)).

m0001 creates the tables from the current models, so a database created by
this version already has the column: add it only when it is missing.
"""

import peewee as pw
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate


def up(db):
    if isinstance(db, pw.PostgresqlDatabase):
        # SQLite does not enforce VARCHAR lengths: only PostgreSQL needs it.
        db.execute_sql("ALTER TABLE message ALTER COLUMN status TYPE VARCHAR(20)")
    columns = {c.name for c in db.get_columns("message")}
    migrator = SchemaMigrator.from_database(db)
    operations = []
    if "unconfirmed_at" not in columns:
        operations.append(
            migrator.add_column(
                "message", "unconfirmed_at", pw.DateTimeField(null=True)
            )
        )
    if "resends" not in columns:
        operations.append(
            migrator.add_column("message", "resends", pw.IntegerField(null=True))
        )
    if operations:
        migrate(*operations)
