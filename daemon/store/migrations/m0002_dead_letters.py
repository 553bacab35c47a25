"""Dead letters for webhook events: `inbound_event.dead_at` and `last_error`.

m0001 creates the tables from the current models, so a database created by
this version already has the columns: add only what is missing.
"""

import peewee as pw
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate


def up(db):
    columns = {c.name for c in db.get_columns("inbound_event")}
    migrator = SchemaMigrator.from_database(db)
    operations = []
    if "last_error" not in columns:
        operations.append(
            migrator.add_column("inbound_event", "last_error", pw.TextField(null=True))
        )
    if "dead_at" not in columns:
        operations.append(
            migrator.add_column("inbound_event", "dead_at", pw.DateTimeField(null=True))
        )
        operations.append(migrator.add_index("inbound_event", ("dead_at",), False))
    if operations:
        migrate(*operations)
