"""The send state machine: claim a row, record what the provider answered,
release it, back off, and give back a dead process's leases."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import NamedTuple

import peewee as pw

from daemon.domain.campaigns.common import campaign_cancelled
from daemon.domain.campaigns.common import contact_opted_out
from daemon.domain.campaigns.lifecycle import maybe_complete
from daemon.store.db import is_postgres
from daemon.store.models import CampaignContact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import utcnow


@dataclass(frozen=True)
class ClaimedMessage:
    """What the send path needs of a claimed row (no ORM object per send)."""

    id: int
    campaign_id: int
    contact_id: int
    kind: int
    phone: str
    body: str
    attempts: int
    failures: int
    idempotency_key: str
    paced_until: dt.datetime | None = None
    created_at: dt.datetime | None = None


# The send path runs these statements thousands of times a second; peewee
# would rebuild their SQL text each time (profiled at ~2 ms of CPU per send),
# so they are written out once. `{p}` is the driver's parameter marker.
_CLAIM_SQL = """
UPDATE message SET status = 'sending', lease_owner = {p}, lease_expires_at = {p},
       attempts = attempts + 1
 WHERE id IN ({ids})
   AND status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= {p})
   AND campaign_id IN (SELECT id FROM campaign WHERE status = 'running')
   AND NOT EXISTS (SELECT 1 FROM contact
                    WHERE contact.id = message.contact_id
                      AND contact.opted_out_at IS NOT NULL)
RETURNING id, campaign_id, contact_id, kind, phone, body, attempts, failures,
          idempotency_key, paced_until, created_at
"""
_STILL_SENDABLE_SQL = """
SELECT 1 FROM message
 WHERE id = {p} AND lease_owner = {p} AND status = 'sending'
   AND EXISTS (SELECT 1 FROM campaign WHERE id = {p} AND status = 'running')
   AND NOT EXISTS (SELECT 1 FROM contact
                    WHERE contact.id = message.contact_id
                      AND contact.opted_out_at IS NOT NULL)
"""
_RECORD_SENT_SQL = """
UPDATE message SET status = CASE WHEN status = 'sending' THEN 'sent' ELSE status END,
       provider_id = {p}, wa_id = {p}, sent_at = COALESCE(sent_at, {p}),
       lease_owner = NULL, lease_expires_at = NULL, error = NULL, paced_until = NULL
 WHERE id = {p} AND lease_owner = {p}
"""


def _sql(template: str) -> str:
    return template.replace("{p}", database.param)


@functools.lru_cache(maxsize=32)
def _claim_sql(count: int, param: str) -> str:
    """The claim of `count` rows, for the driver whose marker is `param`."""
    ids = ", ".join([param] * count)
    return _CLAIM_SQL.replace("{ids}", ids).replace("{p}", param)


def member_message1_sent(now, *where):
    """The member's Message 1 went out: pending -> message_1_sent, keeping the
    first send time. The one definition of that move (an UPDATE to run):
    `record_sent` runs its SQL text, the sweep's repair adds its own WHERE."""
    return CampaignContact.update(
        state=MemberState.MESSAGE_1_SENT,
        message1_sent_at=pw.fn.COALESCE(CampaignContact.message1_sent_at, now),
        updated_at=now,
    ).where(CampaignContact.state == MemberState.PENDING, *where)


# Stand-ins `member_message1_sent` is compiled with for the send path, found
# again in the parameter list and swapped for the real values on each call.
_AT = dt.datetime(1901, 2, 3, 4, 5, 6, 789)
_CAMPAIGN_ID, _CONTACT_ID = -90_001, -90_002


def _member_sent_query(*where):
    return member_message1_sent(
        _AT,
        CampaignContact.contact == _CONTACT_ID,
        # Found through (contact, state), a few entries: `+ 0` keeps the
        # planner off the indexes that start with the campaign. Without
        # statistics for this campaign (never analyzed, or analyzed before
        # it existed) it took (campaign, state, id) and read every pending
        # member of the campaign on each send (W1 cluster ~10 % slower, and
        # O(campaign size) per send).
        (CampaignContact.campaign + pw.SQL("0")) == _CAMPAIGN_ID,
        *where,
    )


@functools.lru_cache(maxsize=4)
def _member_sent_statement(_database_type) -> tuple[str, tuple]:
    sql, params = _member_sent_query().sql()
    return sql, tuple(params)


# PostgreSQL records a send in ONE statement, in autocommit: the row's UPDATE
# is a data-modifying CTE, the member's move another one that finds a row in
# it only if the row's update matched (the lease still ours), and the answer
# is how many rows matched. One round trip and the one commit of the statement
# instead of BEGIN, two UPDATEs and COMMIT; one statement is as atomic as the
# transaction it replaces. Both parts read one snapshot and write different
# tables, so neither misses the other's write. SQLite has no data-modifying
# CTE: it keeps the transaction.
_RECORD_SENT_ONE_SQL = """
WITH m AS ({record} RETURNING 1), moved AS ({member})
SELECT count(*) FROM m
"""
_ONLY_IF_RECORDED = pw.SQL("EXISTS (SELECT 1 FROM m)")


@functools.lru_cache(maxsize=4)
def _record_sent_statement(_database_type, kind: int) -> tuple[str, tuple]:
    """The PostgreSQL record of a sent `kind` message with its member's move:
    the SQL text and the member's parameters (stand-ins, as above)."""
    if kind == 1:
        member = _member_sent_query(_ONLY_IF_RECORDED)
    else:
        member = _member_message2_query(
            _AT, _CAMPAIGN_ID, _CONTACT_ID, _ONLY_IF_RECORDED
        )
    sql, params = member.sql()
    record = _sql(_RECORD_SENT_SQL).strip()
    return _RECORD_SENT_ONE_SQL.format(record=record, member=sql), tuple(params)


def _record_sent_once(message, owner: str, provider_id, wa_id, now) -> int:
    """PostgreSQL: the row and its member in one round trip. Returns how
    many message rows were ours (0 or 1), as the UPDATE's rowcount would."""
    sql, params = _record_sent_statement(type(database.obj), message.kind)
    real = {
        _AT: now,
        _CAMPAIGN_ID: message.campaign_id,
        _CONTACT_ID: message.contact_id,
    }
    cursor = database.execute_sql(
        sql,
        (provider_id, wa_id, now, message.id, owner, *[real.get(p, p) for p in params]),
    )
    return cursor.fetchone()[0]


def _run_member_sent(now, campaign_id: int, contact_id: int) -> None:
    """`member_message1_sent` for one member, without peewee building its SQL
    again (about 0.2 ms of CPU a send)."""
    sql, params = _member_sent_statement(type(database.obj))
    real = {_AT: now, _CAMPAIGN_ID: campaign_id, _CONTACT_ID: contact_id}
    database.execute_sql(sql, [real.get(p, p) for p in params])


def claim(
    message_id: int, owner: str, lease_s: float, now=None
) -> ClaimedMessage | None:
    """Take the row for sending, or None if someone else has it or it is not due."""
    return claim_many([message_id], owner, lease_s, now).get(message_id)


def claim_many(
    message_ids: list[int], owner: str, lease_s: float, now=None
) -> dict[int, ClaimedMessage]:
    """Take several rows in one statement, each as `claim` would take it: a
    batch of Message 1 sends costs one write transaction instead of one a
    row. The rows returned are ours; the caller sends each after checking
    it again (`still_sendable`) or gives it back (`hand_back`)."""
    if not message_ids:
        return {}
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_s)
    sql = _claim_sql(len(message_ids), database.param)
    # Read to the end: the statement (and on SQLite its implicit
    # transaction) is over before the rows are used.
    rows = database.execute_sql(sql, (owner, expires, *message_ids, now)).fetchall()
    return {row[0]: _claimed(row) for row in rows}


def _claimed(row) -> ClaimedMessage:
    # SQLite hands back the stored text: parse it as peewee would.
    return ClaimedMessage(
        *row[:-2],
        Message.paced_until.python_value(row[-2]),
        Message.created_at.python_value(row[-1]),
    )


def still_sendable(message: ClaimedMessage, owner: str) -> bool:
    """A row claimed with others (`claim_many`), right before its send: still
    ours, its campaign still running and its contact not opted out. The
    same conditions as the claim's, read again, so that a STOP or a pause
    that came in while the rows before it were sent is obeyed: the window
    between the last check and the request is the lone claim's."""
    cursor = database.execute_sql(
        _sql(_STILL_SENDABLE_SQL), (message.id, owner, message.campaign_id)
    )
    return cursor.fetchone() is not None


def hand_back(message_ids: list[int], owner: str) -> int:
    """Rows of ours claimed in a batch and never sent (the batch was cut
    short, or a row's check failed): queued again, the attempt not counted.
    Cancelled instead when the contact opted out or the campaign was
    cancelled meanwhile. How many went back to the queue (the caller
    enqueues them)."""
    held = (
        Message.id.in_(message_ids)
        & (Message.lease_owner == owner)
        & (Message.status == MessageStatus.SENDING)
    )
    with database.atomic():
        of_rows = Message.select(Message.campaign).where(held).tuples()
        campaign_ids = {campaign_id for (campaign_id,) in of_rows}
        # No request left for these rows: the claim's attempt is not counted.
        Message.update(attempts=Message.attempts - 1).where(held).execute()
        cancelled = _cancel_withdrawn(held)
        queued = (
            Message.update(
                status=MessageStatus.QUEUED,
                lease_owner=None,
                lease_expires_at=None,
                paced_until=None,
                enqueued_at=utcnow(),
            )
            .where(held)
            .execute()
        )
    if cancelled:
        for campaign_id in campaign_ids:
            maybe_complete(campaign_id)
    return queued


# Why a row may no longer go, tested in this order: the error it keeps.
_WITHDRAWN = (
    ("contact opted out", contact_opted_out),
    ("campaign cancelled", campaign_cancelled),
)


def _cancel_withdrawn(*where) -> str:
    """Cancel the rows matching `where` that may no longer go: their contact
    opted out or their campaign was cancelled. The first reason that
    cancelled a row, or "" when none did."""
    first_reason = ""
    for reason, condition in _WITHDRAWN:
        cancelled = (
            Message.update(
                status=MessageStatus.CANCELLED,
                error=reason,
                lease_owner=None,
                lease_expires_at=None,
                paced_until=None,
                next_attempt_at=None,
            )
            .where(*where, condition())
            .execute()
        )
        if cancelled and not first_reason:
            first_reason = reason
    return first_reason


def cancel_if_withdrawn(message, owner: str) -> str:
    """A held row that may no longer go: cancelled, never re-queued. The
    reason ("contact opted out", "campaign cancelled"), or "" if it may go.

    Every path that would give a claimed row back (retry, pacing release,
    pause, a batch's hand-back) goes through here first, so a STOP or a
    cancel that arrived while the send was in flight is final: the claim
    and the sweeper never look at a cancelled campaign's rows again.
    """
    reason = _cancel_withdrawn(held_by(message, owner))
    if reason:
        maybe_complete(message.campaign_id)
    return reason


def cancel_unclaimable(message_id: int) -> str:
    """A queued row the claim refused: cancelled if it may no longer go (its
    contact opted out, its campaign was cancelled), so it is not swept or
    enqueued again and its campaign can complete. The reason, or ""."""
    reason = _cancel_withdrawn(
        Message.id == message_id, Message.status == MessageStatus.QUEUED
    )
    if reason:
        campaign_id = (
            Message.select(Message.campaign).where(Message.id == message_id).scalar()
        )
        if campaign_id:
            maybe_complete(campaign_id)
    return reason


def release(
    message, owner: str, next_attempt_at, reason: str = "", paced_until=None
) -> bool:
    """Give a claimed row back without counting a failure (pacing, window)."""
    if cancel_if_withdrawn(message, owner):
        return False
    return bool(
        Message.update(
            status=MessageStatus.QUEUED,
            next_attempt_at=next_attempt_at,
            paced_until=paced_until,
            lease_owner=None,
            lease_expires_at=None,
            attempts=Message.attempts - 1,
            enqueued_at=utcnow(),
            error=reason or Message.error,
        )
        .where(held_by(message, owner))
        .execute()
    )


def held_by(message, owner: str):
    """The row is still ours: claimed by `owner` and not moved on since."""
    return (
        (Message.id == message.id)
        & (Message.lease_owner == owner)
        & (Message.status == MessageStatus.SENDING)
    )


@dataclass(frozen=True)
class AcceptedSend:
    """A send the provider accepted, not recorded yet (`record_sent_many`)."""

    message: ClaimedMessage
    provider_id: str | None
    wa_id: str | None
    at: dt.datetime


def record_sent(message, owner: str, provider_id, wa_id, now=None) -> None:
    """The provider accepted the message: sent (unless a webhook got further)."""
    send = AcceptedSend(message, provider_id, wa_id, now or utcnow())
    record_sent_many([send], owner)


def record_sent_many(accepted: list[AcceptedSend], owner: str) -> None:
    """`record_sent` of each accepted send, each row only while it is ours.
    On SQLite in one write transaction: a batch takes the single write lock
    once for all its records (a take per send held W1 at about half its
    rate, docs/benchmarks.md). On PostgreSQL one autocommit statement each,
    as a lone send: a transaction around them would add two round trips."""
    # The row and its member move together: a kill between two commits
    # would leave the member behind for good (and the campaign open).
    recorded = []
    if is_postgres():
        for send in accepted:
            message = send.message
            if _record_sent_once(message, owner, send.provider_id, send.wa_id, send.at):
                recorded.append(message)
    else:
        with database.atomic():
            for send in accepted:
                message, at = send.message, send.at
                values = (send.provider_id, send.wa_id, at, message.id, owner)
                if not database.execute_sql(_sql(_RECORD_SENT_SQL), values).rowcount:
                    continue
                recorded.append(message)
                if message.kind == 1:
                    _run_member_sent(at, message.campaign_id, message.contact_id)
                else:
                    _member_message2_sent(message.campaign_id, message.contact_id, at)
    for campaign_id in {m.campaign_id for m in recorded if m.kind == 2}:
        maybe_complete(campaign_id)


def _member_after_send(campaign_id: int, contact_id: int, kind: int, now) -> None:
    if kind == 1:
        _run_member_sent(now, campaign_id, contact_id)
    else:
        _member_message2_sent(campaign_id, contact_id, now)
        maybe_complete(campaign_id)


def _member_message2_query(now, campaign_id, contact_id, *where):
    """The member's Message 2 went out: interacted -> message_2_sent. Found
    through (contact, state) like the Message 1 move (`+ 0`: see
    _member_sent_query), not through an index that starts with the campaign."""
    return CampaignContact.update(
        state=MemberState.MESSAGE_2_SENT, updated_at=now
    ).where(
        CampaignContact.contact == contact_id,
        CampaignContact.state == MemberState.INTERACTED,
        (CampaignContact.campaign + pw.SQL("0")) == campaign_id,
        *where,
    )


def _member_message2_sent(campaign_id: int, contact_id: int, now) -> None:
    _member_message2_query(now, campaign_id, contact_id).execute()


def unconfirmed_values(now, error: str) -> dict:
    """The row of a send whose outcome is unknown, as an UPDATE's values: the
    worker's own mark, a dead worker's release and the sweep of expired
    leases all write these (daemon/domain/unconfirmed.py says what follows)."""
    return {
        "status": MessageStatus.UNCONFIRMED,
        "unconfirmed_at": now,
        "error": error[:2000],
        "lease_owner": None,
        "lease_expires_at": None,
        "paced_until": None,
    }


def replied_meanwhile(message, owner: str, now) -> bool:
    """A Message 1 whose contact answered while its request was out (the
    reply does not touch a `sending` row, its worker records the outcome):
    it reached them, whatever error the provider answered after taking it (a
    5xx, a timeout behind a proxy). Recorded sent; a retry, or a failure that
    `campaign retry-failed` would queue again, would show it twice."""
    if message.kind != 1:
        return False
    replied = CampaignContact.select().where(
        CampaignContact.campaign == message.campaign_id,
        CampaignContact.contact == message.contact_id,
        CampaignContact.interacted_at.is_null(False),
    )
    if not replied.exists():
        return False
    record_sent(message, owner, None, None, now)
    return True


def record_failure(message, owner: str, reason: str, now=None) -> bool:
    """Permanent failure: failed with the provider's reason."""
    now = now or utcnow()
    # The row and its member move together, as in record_sent: a kill
    # between two commits would leave the member open for good, and its
    # campaign would never complete.
    with database.atomic():
        updated = (
            Message.update(
                status=MessageStatus.FAILED,
                error=reason[:2000],
                failed_at=now,
                lease_owner=None,
                lease_expires_at=None,
                paced_until=None,
            )
            .where(held_by(message, owner))
            .execute()
        )
        if updated:
            member_failed(message.campaign_id, message.contact_id, now, message.kind)
    if updated:
        maybe_complete(message.campaign_id)
    return bool(updated)


def expire_message2(message, owner: str, now=None) -> bool:
    """Message 2 claimed after WhatsApp's 24 h window closed (a paused campaign that
    resumed late): WhatsApp would refuse a free-form message, so the row and
    its member expire instead of being sent."""
    now = now or utcnow()
    with database.atomic():
        updated = (
            Message.update(
                status=MessageStatus.EXPIRED,
                error="WhatsApp's 24 h window closed before Message 2 could be sent",
                lease_owner=None,
                lease_expires_at=None,
            )
            .where(held_by(message, owner))
            .execute()
        )
        if updated:
            CampaignContact.update(state=MemberState.EXPIRED, updated_at=now).where(
                CampaignContact.campaign == message.campaign_id,
                CampaignContact.contact == message.contact_id,
                CampaignContact.state == MemberState.INTERACTED,
            ).execute()
    if updated:
        maybe_complete(message.campaign_id)
    return bool(updated)


# The member states a failure of each kind of message ends: a Message 1
# failing after the contact replied (the reply proved it arrived) changes
# nothing for the member.
_FAILS_MEMBER = {
    1: (MemberState.PENDING, MemberState.MESSAGE_1_SENT),
    2: (MemberState.INTERACTED, MemberState.MESSAGE_2_SENT),
}


def member_failed(campaign_id: int, contact_id: int, now, kind: int) -> None:
    CampaignContact.update(state=MemberState.FAILED, updated_at=now).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.contact == contact_id,
        CampaignContact.state.in_(_FAILS_MEMBER[kind]),
    ).execute()


class Retry(NamedTuple):
    """What `record_retryable` did with a refused send's row."""

    next_at: dt.datetime | None = None  # queued again, due then
    withdrawn: str = ""  # cancelled instead: why (cancel_if_withdrawn)
    failed: bool = False  # its attempts used up: failed instead
    replied: bool = False  # sent instead: its contact answered (replied_meanwhile)
    # None of them: the row was not ours any more (its lease was lost, or
    # an earlier try of this record committed before its error).


def record_retryable(
    message,
    owner: str,
    reason: str,
    delay_s: float,
    max_attempts: int,
    now=None,
) -> Retry:
    """A failure that may succeed later: queued again with next_attempt_at,
    unless the row may no longer go (cancelled) or its attempts are used up
    (failed)."""
    now = now or utcnow()
    if withdrawn := cancel_if_withdrawn(message, owner):
        return Retry(withdrawn=withdrawn)
    if replied_meanwhile(message, owner, now):
        return Retry(replied=True)
    failures = message.failures + 1
    if failures >= max_attempts:
        reason = f"{reason} (after {failures} attempts)"
        return Retry(failed=record_failure(message, owner, reason, now))
    next_at = now + dt.timedelta(seconds=delay_s)
    updated = (
        Message.update(
            status=MessageStatus.QUEUED,
            failures=failures,
            next_attempt_at=next_at,
            error=reason[:2000],
            lease_owner=None,
            lease_expires_at=None,
            # The slot this attempt used is spent: the retry is paced again.
            paced_until=None,
            enqueued_at=now,
        )
        .where(held_by(message, owner))
        .execute()
    )
    return Retry(next_at=next_at) if updated else Retry()


def held_by_process(key: str):
    return Message.lease_owner.startswith(key) & (
        Message.status == MessageStatus.SENDING
    )


def release_leases(key: str, now=None) -> int:
    """A dead process's rows that provably never left: queued again at once.

    `key` is `process_key(host, pid)`. Only for rows the caller knows were
    not on the wire (see daemon/domain/unconfirmed.py for the others).
    """
    return (
        Message.update(
            status=MessageStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=None,
            enqueued_at=None,
        )
        .where(held_by_process(key))
        .execute()
    )
