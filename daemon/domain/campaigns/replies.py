"""Webhooks into the domain: replies (Message 2, opt-out keywords), opt-outs
and provider statuses."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import string
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import peewee as pw

from daemon.domain.campaigns.common import _ATTEMPTED
from daemon.domain.campaigns.common import _OPEN_MESSAGE_STATUSES
from daemon.domain.campaigns.common import _REPLYABLE_STATES
from daemon.domain.campaigns.fanout import _insert_messages
from daemon.domain.campaigns.fanout import _message_row
from daemon.domain.campaigns.lifecycle import maybe_complete
from daemon.domain.campaigns.lifecycle import reopen_for_reply
from daemon.domain.campaigns.sending import _member_after_send
from daemon.domain.campaigns.sending import member_failed
from daemon.domain.contacts.phones import whatsapp_variants
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import Interaction
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import utcnow

log = logging.getLogger(__name__)


def fold_keyword(text: str) -> str:
    """Upper case without accents or surrounding punctuation: 'Arrêt !' -> 'ARRET'."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return bare.strip().strip(string.punctuation + " ").upper()


def is_opt_out(body: str, keywords: Iterable[str]) -> bool:
    return fold_keyword(body) in {fold_keyword(k) for k in keywords}


@dataclass(frozen=True)
class ReplyOutcome:
    outcome: str
    message2_id: int | None = None


def handle_reply(
    phone: str,
    body: str,
    *,
    is_group: bool,
    window_h: float,
    opt_out_keywords: Iterable[str],
    event_id: int | None = None,
    now=None,
    written_at: dt.datetime | None = None,
) -> ReplyOutcome:
    """A contact wrote to us: maybe opt them out, maybe create Message 2.

    `written_at`, the provider's time of the message when it gave one: a
    message written before Message 1 was sent answers nothing (see
    REPLY_CLOCK_SKEW)."""
    now = now or utcnow()
    if is_group:
        return ReplyOutcome("ignored_group")
    contact = Contact.get_or_none(Contact.phone == phone) or _contact_by_variant(phone)
    if contact is None:
        return ReplyOutcome("unknown_contact")
    if is_opt_out(body, opt_out_keywords):
        opt_out_contact(contact, f"replied {body.strip()[:40]!r}", now=now)
        _record_interaction(contact, None, event_id, body, "opted_out", now)
        return ReplyOutcome("opted_out")
    if contact.opted_out_at:
        _record_interaction(contact, None, event_id, body, "opted_out_before", now)
        return ReplyOutcome("opted_out_before")
    with _transaction():
        campaign_id = _take_member_for_reply(contact, window_h, now, written_at)
        if campaign_id is None:
            answered = _answered_member(contact)
            if answered is not None:
                _record_interaction(contact, answered, event_id, body, "already", now)
                return ReplyOutcome("already_interacted")
            _record_interaction(contact, None, event_id, body, "no_open_campaign", now)
            return ReplyOutcome("no_open_campaign")
        campaign = Campaign.get_by_id(campaign_id)
        _confirm_message1_by_reply(campaign.id, contact.id, now)
        ids = _insert_messages([_message_row(campaign, contact, 2, now)])
        if not ids:
            ids = _queue_expired_message2(campaign.id, contact.id, now)
        _record_interaction(contact, campaign, event_id, body, "message_2", now)
    return ReplyOutcome("message_2_queued", ids[0] if ids else None)


def _contact_by_variant(phone: str) -> Contact | None:
    """The contact imported under another form of this WhatsApp number
    (Mexico's 521, Argentina's 549, Brazil's ninth digit), if any."""
    variants = whatsapp_variants(phone)
    return Contact.get_or_none(Contact.phone.in_(variants)) if variants else None


def _transaction():
    """handle_reply's writes in one transaction: its caller's when there is
    one (process_event's, which marks the event processed with them), else
    its own. No savepoint inside the caller's: an error rolls all of it
    back anyway, and a savepoint costs two round trips."""
    if database.in_transaction():
        return contextlib.nullcontext()
    return database.atomic()


def _quoted(values: Iterable[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


# The member a reply answers, moved to `interacted` in one statement: in
# the contact's running or paused campaigns, the member whose Message 1 is
# the latest one attempted within the window (failing that, in a completed
# campaign: _take_member_for_reply). A reply proves the provider
# took Message 1 whatever we know of the attempt: unconfirmed, queued for a
# retry, or a worker that died before recording it (status still
# 'sending'). So the member's Message 1 time is set too when it has none.
# Written out once, as the send path's statements are (sending.py): peewee
# took longer to build this join than PostgreSQL to run it (W6,
# docs/benchmarks.md). `state IN` twice: a reply processed concurrently
# that took the member first makes this one match nothing. A row with no
# send time (attempted, not recorded) is bounded by its creation instead:
# the window plus 30 days. Only such rows: a paced campaign sends rows the
# fan-out made weeks before (a Message 1 sent on day 40 lost its replies).
# A message the contact wrote before its Message 1 was sent answers nothing:
# one written while our webhook was unreachable and delivered by the
# provider's retries (Meta retries for 7 days) after a new campaign's
# Message 1 would otherwise get a Message 2 nobody asked for. The provider's
# clock and ours may differ: a message written up to this long before the
# send still counts.
REPLY_CLOCK_SKEW = dt.timedelta(minutes=10)
_NO_BOUND = dt.datetime(9000, 1, 1)
_TAKE_MEMBER_TEMPLATE = f"""
UPDATE campaign_contact
   SET state = 'interacted', interacted_at = {{p}}, updated_at = {{p}},
       message1_sent_at = COALESCE(message1_sent_at, {{p}})
 WHERE state IN ({_quoted(_REPLYABLE_STATES)})
   AND id = (
       SELECT member.id
         FROM campaign_contact AS member
         JOIN campaign ON campaign.id = member.campaign_id
         JOIN message AS message1 ON message1.campaign_id = member.campaign_id
                                 AND message1.contact_id = member.contact_id
                                 AND message1.kind = 1
        WHERE member.contact_id = {{p}}
          AND member.state IN ({_quoted(_REPLYABLE_STATES)})
          AND campaign.status IN ({{statuses}})
          AND (message1.status IN ({_quoted(_ATTEMPTED)})
               OR (message1.status = 'queued' AND message1.attempts > 0))
          AND (message1.sent_at >= {{p}}
               OR (message1.sent_at IS NULL AND message1.created_at >= {{p}}))
          AND (message1.sent_at IS NULL OR message1.sent_at <= {{p}})
        ORDER BY message1.id DESC
        LIMIT 1)
RETURNING campaign_id
"""
_TAKE_MEMBER_SQL = _TAKE_MEMBER_TEMPLATE.replace(
    "{statuses}", _quoted((CampaignStatus.RUNNING, CampaignStatus.PAUSED))
)
# The same in the contact's completed campaigns: a reply written in time
# whose webhook reached us (the provider retried it) after the expiry job
# had expired the member and the campaign had completed. Only completed:
# a cancelled campaign is never reopened.
_TAKE_COMPLETED_MEMBER_SQL = _TAKE_MEMBER_TEMPLATE.replace(
    "{statuses}", _quoted((CampaignStatus.COMPLETED,))
)


def _take_member_for_reply(
    contact: Contact, window_h: float, now, written_at=None
) -> int | None:
    """The campaign of the member this reply answers, now `interacted`; None
    when no member may take it (see _TAKE_MEMBER_SQL).

    A reply to a running or paused campaign costs the one statement. Only
    when none matched is a completed campaign looked at: its member expired
    (the hourly job) and the campaign completed before this reply, written
    inside the window, reached us. That member takes it all the same, and
    the campaign runs again until its Message 2 is settled (as
    `retry-failed` reopens one). Before 2026-12-07 such a reply was
    `no_open_campaign` and got no Message 2
    (tests/integration/test_audit_late_reply_after_completion.py)."""
    cutoff = now - dt.timedelta(hours=window_h)
    created_after = cutoff - dt.timedelta(days=30)
    sent_before = (written_at or _NO_BOUND) + REPLY_CLOCK_SKEW
    values = (now, now, now, contact.id, cutoff, created_after, sent_before)
    sql = _TAKE_MEMBER_SQL.replace("{p}", database.param)
    row = database.execute_sql(sql, values).fetchone()
    if row:
        return row[0]
    sql = _TAKE_COMPLETED_MEMBER_SQL.replace("{p}", database.param)
    row = database.execute_sql(sql, values).fetchone()
    if row is None:
        return None
    reopen_for_reply(row[0])
    return row[0]


def _queue_expired_message2(campaign_id: int, contact_id: int, now) -> list[int]:
    """The member's Message 2 row exists already: it expired unsent (claimed
    past WhatsApp's 24 h window, a campaign paused too long), and this reply
    came back inside the reply window (`reply_window_h` above 24 h). The
    reply opens a new 24 h window: the row is queued again, its window from
    now (`created_at`, as a new row's). Before, the row stayed expired, the
    member `interacted` for good and the campaign never completed."""
    query = (
        Message.update(
            status=MessageStatus.QUEUED,
            created_at=now,
            attempts=0,
            failures=0,
            next_attempt_at=None,
            paced_until=None,
            error=None,
            enqueued_at=now,
        )
        .where(
            Message.campaign == campaign_id,
            Message.contact == contact_id,
            Message.kind == 2,
            Message.status == MessageStatus.EXPIRED,
        )
        .returning(Message.id)
    )
    return [row[0] for row in query.tuples().execute()]


def _answered_member(contact: Contact) -> Campaign | None:
    """The open campaign in which this contact already replied (a second
    reply: recorded against it, and no second Message 2)."""
    member = (
        CampaignContact.select(CampaignContact, Campaign)
        .join(Campaign)
        .where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(
                (MemberState.INTERACTED, MemberState.MESSAGE_2_SENT)
            ),
            Campaign.status.in_((CampaignStatus.RUNNING, CampaignStatus.PAUSED)),
        )
        .order_by(CampaignContact.id.desc())
        .first()
    )
    return member.campaign if member else None


def _confirm_message1_by_reply(campaign_id: int, contact_id: int, now) -> None:
    """A person answering proves Message 1 reached them: an unconfirmed row,
    or one queued for a retry, is sent, and the retry is off. A row still in
    `sending` is left to the worker that holds it (it records the outcome).
    (The member's Message 1 time is set by _TAKE_MEMBER_SQL.)"""
    Message.update(
        status=MessageStatus.SENT,
        sent_at=pw.fn.COALESCE(Message.sent_at, Message.unconfirmed_at, now),
        next_attempt_at=None,
        paced_until=None,
        error=None,
    ).where(
        Message.campaign == campaign_id,
        Message.contact == contact_id,
        Message.kind == 1,
        Message.status.in_((MessageStatus.UNCONFIRMED, MessageStatus.QUEUED)),
    ).execute()


def _record_interaction(contact, campaign, event_id, body, outcome, now) -> None:
    Interaction.create(
        contact=contact.id,
        campaign=campaign.id if campaign else None,
        event=event_id,
        body=(body or "")[:4000],
        outcome=outcome,
        received_at=now,
    )


def opt_out_contact(contact: Contact, reason: str, now=None) -> None:
    """The contact gets nothing more from any campaign, now or later."""
    now = now or utcnow()
    affected = [
        m.campaign_id
        for m in CampaignContact.select(CampaignContact.campaign).where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(tuple(MemberState.OPEN)),
        )
    ]
    with database.atomic():
        Contact.update(opted_out_at=pw.fn.COALESCE(Contact.opted_out_at, now)).where(
            Contact.id == contact.id
        ).execute()
        CampaignContact.update(state=MemberState.OPTED_OUT, updated_at=now).where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(tuple(MemberState.OPEN)),
        ).execute()
        Message.update(
            status=MessageStatus.CANCELLED, error=f"opted out: {reason}"
        ).where(
            Message.contact == contact.id, Message.status == MessageStatus.QUEUED
        ).execute()
    for campaign_id in affected:
        maybe_complete(campaign_id)
    log.info("contact %s opted out (%s)", contact.phone, reason)


def find_message(reference=None, provider_id=None, wa_id=None) -> Message | None:
    if reference:
        found = Message.get_or_none(Message.idempotency_key == reference)
        if found:
            return found
    for field, value in ((Message.provider_id, provider_id), (Message.wa_id, wa_id)):
        if value:
            found = Message.get_or_none(field == value)
            if found:
                return found
    if provider_id:
        return Message.get_or_none(Message.wa_id == provider_id)
    return None


def apply_status(
    message: Message,
    status: str,
    *,
    error: str | None = None,
    now=None,
    provider_id: str | None = None,
    wa_id: str | None = None,
) -> bool:
    """Move a message forward to `status`; never backwards. True if it moved.

    `provider_id`, `wa_id`: the provider's ids the status carries, stored on
    a row that has none, as a send's answer stores them: the row of a send
    whose answer was lost (unconfirmed, then confirmed by this status) or
    never read (confirmed by a reply) is listed, and found by a later event
    naming only them, as any other."""
    now = now or utcnow()
    ids = _status_ids(message, provider_id, wa_id)
    if status == MessageStatus.FAILED:
        return _apply_failed_status(message, error or "failed", now, ids)
    rank = MessageStatus.RANK.get(status)
    if rank is None or rank < MessageStatus.RANK["sent"]:
        return False
    lower = [s for s, r in MessageStatus.RANK.items() if r < rank]
    # A row never recorded sent (its answer lost: unconfirmed) was sent when
    # it was attempted, not when this status is processed (maybe behind a
    # backlog): the reply window, and which messages a reply may answer
    # (REPLY_CLOCK_SKEW), count from the attempt.
    sent_at = pw.fn.COALESCE(Message.sent_at, Message.unconfirmed_at, now)
    values = {"status": status, "sent_at": sent_at, **ids}
    if status in ("delivered", "read"):
        values["delivered_at"] = pw.fn.COALESCE(Message.delivered_at, now)
    if status == "read":
        values["read_at"] = pw.fn.COALESCE(Message.read_at, now)
    moved = (
        Message.update(**values)
        .where(Message.id == message.id, Message.status.in_(lower))
        .execute()
    )
    if moved and message.status in _OPEN_MESSAGE_STATUSES:
        _member_after_send(message.campaign_id, message.contact_id, message.kind, now)
    elif not moved and ids:
        # Already this far (a reply confirmed it): the ids all the same.
        Message.update(**ids).where(Message.id == message.id).execute()
    return bool(moved)


def _status_ids(message: Message, provider_id, wa_id) -> dict:
    """The row's missing ids (NULL, or "" from an answer that gave none)
    that the status carries, as UPDATE values that keep any the row got
    meanwhile (its send's answer recorded: record_sent). An id too long
    for its column is left out, not a failed event."""
    values = {}
    for field, held, given in (
        (Message.provider_id, message.provider_id, provider_id),
        (Message.wa_id, message.wa_id, wa_id),
    ):
        if given and not held and len(given) <= field.max_length:
            values[field.name] = pw.fn.COALESCE(pw.fn.NULLIF(field, ""), given)
    return values


def _apply_failed_status(message: Message, error: str, now, ids: dict) -> bool:
    # "failed" after "delivered" happens (out-of-order webhooks): the
    # contact has the message, so we keep the better status.
    moved = (
        Message.update(
            status=MessageStatus.FAILED, error=error[:2000], failed_at=now, **ids
        )
        .where(
            Message.id == message.id,
            Message.status.in_(_OPEN_MESSAGE_STATUSES + ("sent",)),
        )
        .execute()
    )
    if moved:
        member_failed(message.campaign_id, message.contact_id, now, message.kind)
        maybe_complete(message.campaign_id)
    return bool(moved)
