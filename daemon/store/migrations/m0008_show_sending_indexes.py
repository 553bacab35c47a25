"""Partial indexes for what `campaign show` says about sending.

`campaign show` counts the rows waiting for a retry, finds the next attempt
and the newest failure. Through ``(campaign_id, status)`` each of those read
every queued (or failed) row of the campaign: a million right after the
fan-out. Each index below holds only the rows its question is about, so the
fan-out's inserts (failures 0, next_attempt_at and failed_at NULL) pay for
none of them:

- ``message_retrying``: rows that failed at least once;
- ``message_waiting``: rows with a time set for their next attempt (a retry
  or a pacing release);
- ``message_failed_at``: rows that failed, newest first.

m0001 creates them on new databases (models.py declares them): create only
what is missing.
"""

INDEXES = {
    "message_retrying": (
        '("campaign_id", "status", "next_attempt_at")',
        "failures > 0",
    ),
    "message_waiting": (
        '("campaign_id", "status", "next_attempt_at")',
        '"next_attempt_at" IS NOT NULL',
    ),
    "message_failed_at": (
        '("campaign_id", "status", "failed_at")',
        '"failed_at" IS NOT NULL',
    ),
}


def up(db):
    present = {index.name for index in db.get_indexes("message")}
    for name, (columns, where) in INDEXES.items():
        if name not in present:
            db.execute_sql(
                f'CREATE INDEX "{name}" ON "message" {columns} WHERE {where}'
            )
