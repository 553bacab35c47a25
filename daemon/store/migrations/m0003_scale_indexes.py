"""Indexes for campaigns of a million members.

- ``campaign_contact (campaign_id, state, id)``: the fan-out walks a campaign's
  pending members in id order from a cursor, and `campaign show` counts the
  members per state, both from this index alone.
- ``message (campaign_id, kind, status)``: `campaign show` counts the
  messages per kind and status from this index alone.

m0001 creates the tables from the current models, so a database created by
this version already has them: add only what is missing.
"""

from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate

INDEXES = (
    ("campaign_contact", ("campaign_id", "state", "id")),
    ("message", ("campaign_id", "kind", "status")),
)


def up(db):
    migrator = SchemaMigrator.from_database(db)
    operations = []
    for table, columns in INDEXES:
        present = {tuple(index.columns) for index in db.get_indexes(table)}
        if columns not in present:
            operations.append(migrator.add_index(table, columns, False))
    if operations:
        migrate(*operations)
