"""`number_check`: one row per contact's WhatsApp number check.

A check used to be only a queue entry (a lost entry was lost for good, and
nothing said which checks were waiting). The row is the check now: pending
with the time it may run, then its outcome (daemon/domain/contacts/
verification.py).

m0001 creates the tables from the current models, so a database created by
this version already has it: create it only when missing. The table is
declared here as it was at this version (not from models.py), so this
migration keeps meaning the same thing.

Contacts an older version checked (contact.wa_status valid or invalid, with
wa_checked_at) get a finished row with that outcome and time, so `campaign
show` does not count them as never checked after the upgrade.
"""

import peewee as pw


def up(db):
    if "number_check" in db.get_tables():
        return

    class _Contact(pw.Model):
        class Meta:
            database = db
            table_name = "contact"
            legacy_table_names = False

    class _NumberCheck(pw.Model):
        contact = pw.ForeignKeyField(_Contact, on_delete="CASCADE", unique=True)
        status = pw.CharField(max_length=10, default="pending")
        requested_at = pw.DateTimeField()
        due_at = pw.DateTimeField()
        enqueued_at = pw.DateTimeField(null=True)
        attempts = pw.IntegerField(default=0)
        lease_expires_at = pw.DateTimeField(null=True)
        checked_at = pw.DateTimeField(null=True)
        error = pw.TextField(null=True)

        class Meta:
            database = db
            table_name = "number_check"
            legacy_table_names = False  # index names: number_check_...
            indexes = ((("status", "due_at"), False),)

    db.create_tables([_NumberCheck])
    db.execute_sql(
        "INSERT INTO number_check (contact_id, status, requested_at, due_at,"
        " attempts, checked_at)"
        " SELECT id, wa_status, wa_checked_at, wa_checked_at, 1, wa_checked_at"
        " FROM contact"
        " WHERE wa_status IN ('valid', 'invalid') AND wa_checked_at IS NOT NULL"
    )
