"""The tables. The database row is the source of truth; queues carry only ids.

Timestamps are naive UTC datetimes (peewee stores them the same way on SQLite
and PostgreSQL); use `utcnow()` for every write.
"""

from __future__ import annotations

import datetime as dt
import json

import peewee as pw

from daemon.store.statuses import MessageStatus  # noqa: F401 - re-exported

database = pw.DatabaseProxy()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def iso_z(value, timespec: str = "auto") -> str | None:
    """A stored (naive UTC) timestamp as ISO 8601 with a Z; None stays None.

    Text, as SQLite returns MIN() over a COALESCE, is normalized the same way.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value.replace(" ", "T") + ("" if value.endswith("Z") else "Z")
    return value.isoformat(timespec=timespec) + "Z"


def duration_text(seconds) -> str:
    """Seconds as an operator reads them: 45s, 3m07s, 2h05m, 3d04h; None: -."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


class JSONField(pw.TextField):
    """JSON text that works the same on SQLite and PostgreSQL."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, ensure_ascii=False)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class WaStatus:
    UNKNOWN = "unknown"
    VALID = "valid"
    INVALID = "invalid"


class Contact(BaseModel):
    phone = pw.CharField(max_length=20, unique=True)  # E.164 with '+'
    name = pw.CharField(max_length=200, default="")
    variables = JSONField(default=dict)
    wa_status = pw.CharField(max_length=10, default=WaStatus.UNKNOWN)
    wa_checked_at = pw.DateTimeField(null=True)
    opted_out_at = pw.DateTimeField(null=True)
    created_at = pw.DateTimeField(default=utcnow)


class CampaignStatus:
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class Campaign(BaseModel):
    name = pw.CharField(max_length=200)
    message1 = pw.TextField()
    message2 = pw.TextField()
    status = pw.CharField(max_length=12, default=CampaignStatus.DRAFT, index=True)
    # Why a campaign paused itself (e.g. the provider flagged spam).
    status_reason = pw.TextField(default="")
    skip_invalid = pw.BooleanField(default=True)
    created_at = pw.DateTimeField(default=utcnow)
    started_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True)
    # Written once by create_campaign (members) and once per fan-out batch
    # (Message 1 rows), so `campaign show` can tell the biggest count
    # (pending members, queued Message 1) without reading a million index
    # entries (m0007). NULL: not known (a campaign made by an older version).
    members_total = pw.IntegerField(null=True)
    message1_total = pw.IntegerField(null=True)


class MemberState:
    PENDING = "pending"
    MESSAGE_1_SENT = "message_1_sent"
    INTERACTED = "interacted"
    MESSAGE_2_SENT = "message_2_sent"
    EXPIRED = "expired"
    OPTED_OUT = "opted_out"
    FAILED = "failed"
    SKIPPED = "skipped"  # not on WhatsApp, left out of the campaign

    FINAL = frozenset({"message_2_sent", "expired", "opted_out", "failed", "skipped"})
    OPEN = frozenset({"pending", "message_1_sent", "interacted"})


class CampaignContact(BaseModel):
    # No index of their own: (campaign, contact) and (contact, state) lead
    # with them (m0006).
    campaign = pw.ForeignKeyField(
        Campaign, backref="members", on_delete="CASCADE", index=False
    )
    contact = pw.ForeignKeyField(
        Contact, backref="memberships", on_delete="CASCADE", index=False
    )
    state = pw.CharField(max_length=16, default=MemberState.PENDING)
    message1_sent_at = pw.DateTimeField(null=True)
    interacted_at = pw.DateTimeField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = (
            (("campaign", "contact"), True),
            (("contact", "state"), False),
            # The fan-out's cursor walk and the per-state counts (m0003).
            (("campaign", "state", "id"), False),
        )


class Message(BaseModel):
    # No index of its own: the (campaign, ...) indexes lead with it (m0006).
    campaign = pw.ForeignKeyField(
        Campaign, backref="messages", on_delete="CASCADE", index=False
    )
    contact = pw.ForeignKeyField(Contact, backref="messages", on_delete="CASCADE")
    kind = pw.SmallIntegerField()  # 1 = Message 1, 2 = Message 2
    # The number and text as sent: the send path needs no join, and a later
    # edit of the contact does not change what was sent.
    phone = pw.CharField(max_length=20)
    body = pw.TextField()
    status = pw.CharField(max_length=20, default=MessageStatus.QUEUED)
    priority = pw.SmallIntegerField(default=0)
    # Claims (including ones cut short by a crash) and provider failures;
    # only failures count toward retry.max_attempts.
    attempts = pw.IntegerField(default=0)
    failures = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(null=True)
    # A pacing slot already reserved for this row: when it comes back at
    # that time it sends without reserving another one.
    paced_until = pw.DateTimeField(null=True)
    # Last time a queue entry was made for this row; the sweeper re-enqueues
    # rows that are due and have not been enqueued for a while.
    enqueued_at = pw.DateTimeField(null=True)
    lease_owner = pw.CharField(max_length=100, null=True)
    lease_expires_at = pw.DateTimeField(null=True)
    # When the attempt whose outcome is unknown was made (status unconfirmed),
    # and how often an unconfirmed attempt was re-sent for want of evidence
    # (provider.unconfirmed = "resend"): each one may be a second message.
    unconfirmed_at = pw.DateTimeField(null=True)
    # Nullable: the send path's raw INSERTs leave it out.
    resends = pw.IntegerField(null=True)
    # Sent to the provider as `reference`: a re-send after a crash carries
    # the same key, so the provider (and we) can tell it is the same message.
    idempotency_key = pw.CharField(max_length=80, unique=True)
    # Indexed only where set (partial indexes below, m0006): NULL at insert.
    provider_id = pw.CharField(max_length=120, null=True)
    wa_id = pw.CharField(max_length=200, null=True)
    error = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    sent_at = pw.DateTimeField(null=True)
    delivered_at = pw.DateTimeField(null=True)
    read_at = pw.DateTimeField(null=True)
    failed_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = (
            # The guarantee "one Message 1 and at most one Message 2 per
            # contact and campaign" is this constraint, not a check.
            (("campaign", "contact", "kind"), True),
            (("status", "next_attempt_at"), False),
            (("campaign", "status"), False),
            # `campaign show` counts by kind and status from the index (m0003).
            (("campaign", "kind", "status"), False),
        )


class InboundEvent(BaseModel):
    provider = pw.CharField(max_length=20)
    dedupe_key = pw.CharField(max_length=300, unique=True)
    event_type = pw.CharField(max_length=60, default="")
    payload = pw.TextField()
    received_at = pw.DateTimeField(default=utcnow)
    processed_at = pw.DateTimeField(null=True, index=True)
    # Failed processing attempts; at events.max_attempts the event is moved
    # to the dead letters (dead_at set) with its last error, out of the
    # sweeper's replays and the expiry clamp, until an operator replays it.
    attempts = pw.IntegerField(default=0)
    result = pw.TextField(null=True)
    last_error = pw.TextField(null=True)
    dead_at = pw.DateTimeField(null=True, index=True)


class Interaction(BaseModel):
    """A reply from a contact (every reply is kept, even ones that send nothing)."""

    contact = pw.ForeignKeyField(Contact, backref="interactions", on_delete="CASCADE")
    campaign = pw.ForeignKeyField(Campaign, null=True, on_delete="SET NULL")
    event = pw.ForeignKeyField(InboundEvent, null=True, on_delete="SET NULL")
    body = pw.TextField(default="")
    outcome = pw.CharField(max_length=30, default="")
    received_at = pw.DateTimeField(default=utcnow)


class DailyCounter(BaseModel):
    day = pw.DateField()
    name = pw.CharField(max_length=60)
    value = pw.BigIntegerField(default=0)
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("day", "name"), True),)


class Alert(BaseModel):
    key = pw.CharField(max_length=120, index=True)
    severity = pw.CharField(max_length=10, default="critical")
    message = pw.TextField()
    raised_at = pw.DateTimeField(default=utcnow)
    resolved_at = pw.DateTimeField(null=True)


class Lease(BaseModel):
    """Named leases: leader election, pacing slots, one-at-a-time jobs."""

    name = pw.CharField(max_length=120, unique=True)
    owner = pw.CharField(max_length=120, default="")
    expires_at = pw.DateTimeField(null=True)
    # A free slot of data: pacing keeps its next free send time here.
    value = pw.TextField(default="")


class JobRun(BaseModel):
    job = pw.CharField(max_length=60, unique=True)
    last_run_at = pw.DateTimeField(null=True)
    last_result = pw.TextField(default="")


class CheckStatus:
    """A number check's status: waiting to run, or its outcome. `unknown`:
    the provider could not tell (errors past the retries, a refused number,
    no number check at all, as with Meta), or the contact opted out first."""

    PENDING = "pending"
    VALID = "valid"  # on WhatsApp
    INVALID = "invalid"  # not on WhatsApp
    UNKNOWN = "unknown"

    ALL = (PENDING, VALID, INVALID, UNKNOWN)


class NumberCheck(BaseModel):
    """One contact's WhatsApp number check (m0009): pending until a
    verification worker runs it, then its outcome. The queue entry carries
    this row's id; a pending row whose entry was lost is swept like a message.
    `Contact.wa_status` stays the verdict the fan-out reads: a finished check
    writes it, a pending re-check leaves the previous one in place."""

    contact = pw.ForeignKeyField(
        Contact, backref="number_check", on_delete="CASCADE", unique=True
    )
    status = pw.CharField(max_length=10, default=CheckStatus.PENDING)
    requested_at = pw.DateTimeField(default=utcnow)
    # When the check may run: paced at campaigns.verify_per_minute after the
    # pending checks requested before it; a retry moves it to its backoff.
    due_at = pw.DateTimeField()
    # When its queue entry becomes runnable (its eta); the sweeper re-enqueues
    # due rows whose entry is older than its grace.
    enqueued_at = pw.DateTimeField(null=True)
    # Claims (a worker taking it, including ones cut short by a crash).
    attempts = pw.IntegerField(default=0)
    # A worker holds the row until then (NULL: nobody).
    lease_expires_at = pw.DateTimeField(null=True)
    checked_at = pw.DateTimeField(null=True)
    error = pw.TextField(null=True)

    class Meta:
        indexes = ((("status", "due_at"), False),)


class HealthCheck(BaseModel):
    checked_at = pw.DateTimeField(default=utcnow, index=True)
    ok = pw.BooleanField()
    details = JSONField(default=dict)


class ConsoleLogout(BaseModel):
    """A console session ended by "Log out" (its cookie's SHA-256), kept until
    the cookie would have expired anyway, so a copy of it is refused."""

    session_digest = pw.CharField(max_length=64, primary_key=True)
    expires_at = pw.DateTimeField(index=True)


MODELS = [
    Contact,
    Campaign,
    CampaignContact,
    Message,
    InboundEvent,
    Interaction,
    DailyCounter,
    Alert,
    Lease,
    JobRun,
    HealthCheck,
    NumberCheck,
    ConsoleLogout,
]


# `campaign show` sums a campaign's re-sends from this (m0005): a partial
# index holds only the few re-sent rows.
Message.add_index(
    Message.index(Message.campaign, name="message_campaign_id_resent").where(
        Message.resends > 0
    )
)
# Looked up by equality only, and NULL on every row the fan-out inserts: a
# partial index costs those inserts nothing (m0006; an equality implies
# IS NOT NULL, so both databases still use it).
for _field in (Message.provider_id, Message.wa_id, Message.lease_owner):
    Message.add_index(
        Message.index(_field, name=f"message_{_field.column_name}_set").where(
            _field.is_null(False)
        )
    )
del _field
# What `campaign show` says about sending (m0008): rows that failed at least
# once, rows with a next attempt time, failed rows by time. The fan-out's
# inserts match none of the conditions, so they pay for none of these.
for _name, _fields, _where in (
    (
        "message_retrying",
        (Message.campaign, Message.status, Message.next_attempt_at),
        Message.failures > 0,
    ),
    (
        "message_waiting",
        (Message.campaign, Message.status, Message.next_attempt_at),
        Message.next_attempt_at.is_null(False),
    ),
    (
        "message_failed_at",
        (Message.campaign, Message.status, Message.failed_at),
        Message.failed_at.is_null(False),
    ),
):
    Message.add_index(Message.index(*_fields, name=_name).where(_where))
del _name, _fields, _where
