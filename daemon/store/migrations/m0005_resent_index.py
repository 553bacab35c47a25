"""A partial index on re-sent messages: `message (campaign_id) WHERE resends > 0`.

`campaign show` sums a campaign's re-sends; without it that reads every
message of the campaign (over a second at a million). Partial: only the few
re-sent rows are in it, so sends do not pay for it. After m0004 (which adds
the column); m0001 creates it on new databases (models.py adds it to
Message), so add it only if missing.
"""

INDEX = "message_campaign_id_resent"


def up(db):
    present = {index.name for index in db.get_indexes("message")}
    if INDEX not in present:
        db.execute_sql(
            f'CREATE INDEX "{INDEX}" ON "message" ("campaign_id") WHERE resends > 0'
        )
