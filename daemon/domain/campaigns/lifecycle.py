"""A campaign's lifecycle: create, start, pause, resume, cancel, retry the
failed messages, complete."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from daemon.domain import pacing
from daemon.domain.campaigns.common import _CHUNK
from daemon.domain.campaigns.common import _OPEN_MESSAGE_STATUSES
from daemon.domain.campaigns.common import contact_opted_out
from daemon.domain.campaigns.templates import _check_contact_has
from daemon.domain.campaigns.templates import _Recipient
from daemon.domain.campaigns.templates import template_fields
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

# What an operator reads in the journal for each transition.
_LOGGED_AS = {
    "start": "started",
    "pause": "paused",
    "resume": "resumed",
    "cancel": "cancelled",
}


def create_campaign(
    name: str,
    message1: str,
    message2: str,
    contact_ids: Iterable[int] | None,
    *,
    skip_invalid: bool = True,
) -> Campaign:
    """Create a draft campaign; every contact must fill every template variable.

    `contact_ids` None means every contact. Bounded memory at a million
    contacts: the contacts are read as tuples, `_MEMBER_CHUNK` at a time in id
    order, and each chunk's members written by one INSERT ... SELECT.
    """
    name = (name or "").strip()
    if not name:
        raise InputError("campaign name is empty")
    for label, text in (("message1", message1), ("message2", message2)):
        if not text or not text.strip():
            raise InputError(f"{label} is empty")
        if len(text) > 4096:
            raise InputError(f"{label} is longer than 4096 characters")
    fields = template_fields(message1) | template_fields(message2)
    ids = None if contact_ids is None else sorted(set(contact_ids))
    with database.atomic():
        campaign = Campaign.create(
            name=name, message1=message1, message2=message2, skip_invalid=skip_invalid
        )
        now = utcnow()
        total = 0
        # A contact that does not exist wins over a missing variable (the
        # lowest such id), as when every contact was loaded first.
        template_error: InputError | None = None
        for chunk in _contact_chunks(ids):
            if template_error is None:
                template_error = _check_chunk(fields, chunk)
            if template_error is not None:
                # Only existence is left to check: no rows to write.
                _check_exist(chunk)
                continue
            total += _insert_members(campaign.id, chunk, now)
        if template_error is not None:
            raise template_error
        Campaign.update(members_total=total).where(Campaign.id == campaign.id).execute()
        campaign.members_total = total
    return campaign


# Contacts per query and INSERT ... SELECT in create_campaign.
_MEMBER_CHUNK = 5000


def _contact_chunks(ids: list[int] | None):
    """(first id, last id, ids or None for "every contact in that range")."""
    if ids is not None:
        for start in range(0, len(ids), _MEMBER_CHUNK):
            chunk = ids[start : start + _MEMBER_CHUNK]
            yield chunk[0], chunk[-1], chunk
        return
    after = 0
    while True:
        rows = database.execute_sql(
            f"SELECT id FROM contact WHERE id > {database.param} ORDER BY id "
            f"LIMIT {_MEMBER_CHUNK}",
            (after,),
        ).fetchall()
        if not rows:
            return
        yield rows[0][0], rows[-1][0], None
        after = rows[-1][0]


def _chunk_where(chunk) -> tuple[str, list]:
    first, last, ids = chunk
    p = database.param
    if ids is None:
        return f"id >= {p} AND id <= {p}", [first, last]
    return f"id IN ({', '.join([p] * len(ids))})", list(ids)


def _check_exist(chunk) -> None:
    first, last, ids = chunk
    if ids is None:
        return
    where, params = _chunk_where(chunk)
    found = {
        row[0]
        for row in database.execute_sql(
            f"SELECT id FROM contact WHERE {where}", params
        ).fetchall()
    }
    if len(found) != len(ids):
        missing = min(set(ids) - found)
        raise NotFoundError(f"contact {missing} does not exist")


def _check_chunk(fields: set[str], chunk) -> InputError | None:
    """The chunk's contacts exist (NotFoundError) and fill every variable.

    Returns the first missing variable, in contact id order, as an error to
    raise once every later chunk is known to exist. An opted-out contact gets
    nothing, so its variables do not matter.
    """
    _check_exist(chunk)
    if not fields:
        return None
    where, params = _chunk_where(chunk)
    rows = database.execute_sql(
        f"SELECT id, phone, name, variables FROM contact WHERE {where} "
        "AND opted_out_at IS NULL ORDER BY id",
        params,
    )
    parse = Contact.variables.python_value
    for _, phone, contact_name, variables in rows:
        contact = _Recipient(phone, contact_name, parse(variables))
        try:
            _check_contact_has(fields, contact)
        except InputError as exc:
            return exc
    return None


def _insert_members(campaign_id: int, chunk, now) -> int:
    """The chunk's contacts as members; how many rows were written."""
    where, params = _chunk_where(chunk)
    p = database.param
    cursor = database.execute_sql(
        "INSERT INTO campaign_contact (campaign_id, contact_id, state, updated_at) "
        f"SELECT {p}, id, CASE WHEN opted_out_at IS NULL THEN {p} ELSE {p} END, {p} "
        # Opted-out contacts stay out of every later campaign.
        f"FROM contact WHERE {where} ORDER BY id",
        [campaign_id, MemberState.PENDING, MemberState.OPTED_OUT, now, *params],
    )
    return cursor.rowcount


def get_campaign(campaign_id: int) -> Campaign:
    campaign = Campaign.get_or_none(Campaign.id == campaign_id)
    if campaign is None:
        raise NotFoundError(f"campaign {campaign_id} does not exist")
    return campaign


def _set_status(campaign_id: int, allowed: tuple[str, ...], new: str, **extra) -> int:
    return (
        Campaign.update(status=new, **extra)
        .where(Campaign.id == campaign_id, Campaign.status.in_(allowed))
        .execute()
    )


def _transition(campaign_id, allowed, new, verb, **extra) -> Campaign:
    campaign = get_campaign(campaign_id)
    if not _set_status(campaign_id, allowed, new, **extra):
        campaign = get_campaign(campaign_id)
        hint = _HINTS.get((verb, campaign.status), "")
        raise StateError(
            f"cannot {verb} campaign {campaign_id}: it is {campaign.status}{hint}"
        )
    reason = extra.get("status_reason")
    log.info(
        "campaign %s %s%s",
        campaign_id,
        _LOGGED_AS[verb],
        f": {reason}" if reason else "",
    )
    return get_campaign(campaign_id)


_HINTS = {
    ("start", CampaignStatus.PAUSED): " (resume it: campaign resume)",
    ("resume", CampaignStatus.DRAFT): " (start it: campaign start)",
}


def start_campaign(campaign_id: int, tasks) -> Campaign:
    """draft -> running, then fan out Message 1 in the background."""
    campaign = _transition(
        campaign_id,
        (CampaignStatus.DRAFT,),
        CampaignStatus.RUNNING,
        "start",
        started_at=utcnow(),
        # A draft has no messages; the fan-out adds each batch's count.
        message1_total=0,
    )
    tasks.enqueue_fanout(campaign_id)
    return campaign


def pause_campaign(campaign_id: int, reason: str = "") -> Campaign:
    """running -> paused: no new sends; sends already in flight finish.

    The pacing slots its queued rows had reserved are given up: the device
    is free for other campaigns meanwhile (pacing.rewind_lines), and on
    resume each row takes a new one."""
    with database.atomic():
        campaign = _transition(
            campaign_id,
            (CampaignStatus.RUNNING,),
            CampaignStatus.PAUSED,
            "pause",
            status_reason=reason,
        )
        slots = (
            Message.update(paced_until=None, next_attempt_at=None)
            .where(
                Message.campaign == campaign_id,
                Message.status == MessageStatus.QUEUED,
                Message.paced_until.is_null(False),
            )
            .execute()
        )
        if slots:
            pacing.rewind_lines()
    return campaign


def resume_campaign(campaign_id: int, tasks) -> Campaign:
    campaign = _transition(
        campaign_id,
        (CampaignStatus.PAUSED,),
        CampaignStatus.RUNNING,
        "resume",
        status_reason="",
    )
    tasks.enqueue_fanout(campaign_id)
    due = _due_messages(campaign_id)
    # Each at its own priority: a Message 2 (a reply that came during the
    # pause) before the Message 1s still to go, as when the campaign runs,
    # not behind them all (before 2026-12-07;
    # tests/integration/test_audit_pause_resume.py).
    for message_id, _, priority in sorted(due, key=lambda row: row[1] == 1):
        tasks.send_single_message(message_id, priority=priority)
    return campaign


def cancel_campaign(campaign_id: int) -> Campaign:
    """Any open state -> cancelled; messages not yet sent are cancelled."""
    with database.atomic():
        campaign = _transition(
            campaign_id,
            (CampaignStatus.DRAFT, CampaignStatus.RUNNING, CampaignStatus.PAUSED),
            CampaignStatus.CANCELLED,
            "cancel",
            finished_at=utcnow(),
        )
        slots = (
            Message.select(Message.id)
            .where(
                Message.campaign == campaign_id,
                Message.status == MessageStatus.QUEUED,
                Message.paced_until.is_null(False),
            )
            .exists()
        )
        Message.update(status=MessageStatus.CANCELLED, paced_until=None).where(
            Message.campaign == campaign_id,
            Message.status.in_((MessageStatus.QUEUED, MessageStatus.PENDING)),
        ).execute()
        if slots:
            # Its backlog's pacing slots are free for other campaigns.
            pacing.rewind_lines()
    return campaign


def retry_failed(campaign_id: int, tasks) -> int:
    """Queue every failed message of a campaign again, from attempt zero.

    Messages to contacts who opted out since are left failed: an opt-out is
    final, whatever the operator retries. So is a cancel: a cancelled
    campaign's failed rows stay failed, with their reasons (before
    2026-12-07 they were queued, then cancelled unsent, the answer saying
    "retried"; tests/integration/test_audit_cancel.py).
    """
    with database.atomic():
        status = get_campaign(campaign_id).status
        if status == CampaignStatus.CANCELLED:
            raise StateError(
                f"cannot retry-failed campaign {campaign_id}: it is {status}"
            )
        failed = list(
            Message.select(
                Message.id, Message.kind, Message.contact, Message.priority
            ).where(
                Message.campaign == campaign_id,
                Message.status == MessageStatus.FAILED,
                ~contact_opted_out(),
            )
        )
        if not failed:
            return 0
        ids = [m.id for m in failed]
        for start in range(0, len(ids), _CHUNK):
            # A new send: the times of the failed one (accepted, then
            # reported failed) go, so the reply window and the expiry count
            # from the new one (record_sent keeps a sent_at already there).
            Message.update(
                status=MessageStatus.QUEUED,
                attempts=0,
                failures=0,
                next_attempt_at=None,
                error=None,
                failed_at=None,
                sent_at=None,
                delivered_at=None,
                read_at=None,
                enqueued_at=utcnow(),
            ).where(Message.id.in_(ids[start : start + _CHUNK])).execute()
        for kind, back_to in ((1, MemberState.PENDING), (2, MemberState.INTERACTED)):
            contacts = [m.contact_id for m in failed if m.kind == kind]
            # Message 1 again: its member's send time is the new one's too.
            again = {"message1_sent_at": None} if kind == 1 else {}
            for start in range(0, len(contacts), _CHUNK):
                CampaignContact.update(
                    state=back_to, updated_at=utcnow(), **again
                ).where(
                    CampaignContact.campaign == campaign_id,
                    CampaignContact.contact.in_(contacts[start : start + _CHUNK]),
                    CampaignContact.state == MemberState.FAILED,
                ).execute()
        _set_status(
            campaign_id,
            (CampaignStatus.COMPLETED,),
            CampaignStatus.RUNNING,
            finished_at=None,
        )
    # Each at its own priority, Message 2 first (as on resume).
    for message in sorted(failed, key=lambda m: m.kind == 1):
        tasks.send_single_message(message.id, priority=message.priority)
    log.info("campaign %s: %d failed messages queued again", campaign_id, len(ids))
    return len(ids)


def reopen_for_reply(campaign_id: int) -> bool:
    """completed -> running: a reply written inside its member's window took
    that member after the campaign completed (its webhook retried by the
    provider past the expiry job), so its Message 2 is to be sent, which the
    claim allows only in a running campaign. It completes again once that
    Message 2 is settled (maybe_complete), as after `retry-failed`. Only a
    completed campaign: a cancelled one is never reopened."""
    reopened = _set_status(
        campaign_id,
        (CampaignStatus.COMPLETED,),
        CampaignStatus.RUNNING,
        finished_at=None,
    )
    if reopened:
        log.info("campaign %s running again: a reply written in time", campaign_id)
    return bool(reopened)


def maybe_complete(campaign_id: int) -> bool:
    """running -> completed once every contact reached a final state."""
    open_members = CampaignContact.select(CampaignContact.id).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.state.in_(tuple(MemberState.OPEN)),
    )
    open_messages = Message.select(Message.id).where(
        Message.campaign == campaign_id,
        Message.status.in_(_OPEN_MESSAGE_STATUSES),
    )
    if open_members.exists() or open_messages.exists():
        return False
    completed = _set_status(
        campaign_id,
        (CampaignStatus.RUNNING,),
        CampaignStatus.COMPLETED,
        finished_at=utcnow(),
    )
    if completed:
        log.info("campaign %s completed", campaign_id)
    return bool(completed)


def due_message_ids(campaign_id: int) -> list[int]:
    return [message_id for message_id, _, _ in _due_messages(campaign_id)]


def _due_messages(campaign_id: int) -> list[tuple[int, int, int]]:
    """(id, kind, priority) of the campaign's queued rows due now, by id."""
    now = utcnow()
    return list(
        Message.select(Message.id, Message.kind, Message.priority)
        .where(
            Message.campaign == campaign_id,
            Message.status == MessageStatus.QUEUED,
            Message.next_attempt_at.is_null() | (Message.next_attempt_at <= now),
        )
        .order_by(Message.id)
        .tuples()
    )
