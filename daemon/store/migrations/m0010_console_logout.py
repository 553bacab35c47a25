"""`console_logout`: console sessions ended by "Log out".

A session cookie is a signed time stamp: before this table, "Log out" only
cleared the cookie in that browser and a copy stayed valid until it expired.

m0001 creates the tables from the current models, so a database created by
this version already has it: create it only when missing. The table is
declared here as it was at this version (not from models.py), so this
migration keeps meaning the same thing.
"""

import peewee as pw


def up(db):
    if "console_logout" in db.get_tables():
        return

    class _ConsoleLogout(pw.Model):
        session_digest = pw.CharField(max_length=64, primary_key=True)
        expires_at = pw.DateTimeField(index=True)

        class Meta:
            database = db
            table_name = "console_logout"
            legacy_table_names = False

    db.create_tables([_ConsoleLogout])
