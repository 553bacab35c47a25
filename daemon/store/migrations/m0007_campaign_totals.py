"""`campaign.members_total` and `campaign.message1_total`.

Written by create_campaign and by each fan-out batch; `campaign show` derives
the pending members and the queued Message 1 rows from them instead of
counting a million index entries (each also a heap visit on PostgreSQL until
VACUUM has marked the pages all-visible). NULL for campaigns made before:
those are counted as before.

m0001 creates the tables from the current models, so a database created by
this version already has the columns: add them only when missing.
"""

import peewee as pw
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate

COLUMNS = ("members_total", "message1_total")


def up(db):
    present = {c.name for c in db.get_columns("campaign")}
    migrator = SchemaMigrator.from_database(db)
    operations = [
        migrator.add_column("campaign", name, pw.IntegerField(null=True))
        for name in COLUMNS
        if name not in present
    ]
    if operations:
        migrate(*operations)
