"""Fewer indexes for the fan-out to maintain (a million Message 1 rows).

Dropped, each covered by an index that leads with the same columns:

- ``message (campaign_id)``: by ``message (campaign_id, contact_id, kind)``
  and the other (campaign_id, ...) indexes;
- ``campaign_contact (campaign_id)``: by the unique (campaign_id, contact_id);
- ``campaign_contact (contact_id)``: by (contact_id, state);
- ``campaign_contact (campaign_id, state)``: by (campaign_id, state, id).

Made partial (``WHERE column IS NOT NULL``): ``message (provider_id)``,
``(wa_id)`` and ``(lease_owner)``, NULL on every row the fan-out inserts and
only looked up by equality (which implies IS NOT NULL, so SQLite and
PostgreSQL still use them); each inserted Message 1 then updates 3 indexes
fewer.

m0001 creates the tables from the current models, so a database created by
this version already has the new shape: drop only what is present, create
only what is missing.
"""

DROP = {
    "message": (
        "message_campaign_id",
        "message_provider_id",
        "message_wa_id",
        "message_lease_owner",
    ),
    "campaign_contact": (
        "campaign_contact_campaign_id",
        "campaign_contact_contact_id",
        "campaign_contact_campaign_id_state",
    ),
}
PARTIAL = ("provider_id", "wa_id", "lease_owner")


def up(db):
    for table, names in DROP.items():
        present = {index.name for index in db.get_indexes(table)}
        for name in names:
            if name in present:
                db.execute_sql(f'DROP INDEX "{name}"')
    present = {index.name for index in db.get_indexes("message")}
    for column in PARTIAL:
        name = f"message_{column}_set"
        if name not in present:
            db.execute_sql(
                f'CREATE INDEX "{name}" ON "message" ("{column}") '
                f'WHERE "{column}" IS NOT NULL'
            )
