"""The sweeper: rows and events lost with a worker, members left behind their
messages, interactions past the reply window."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

import peewee as pw

from daemon.domain.campaigns.common import _CHUNK
from daemon.domain.campaigns.common import _SENT_OR_LATER
from daemon.domain.campaigns.fanout import _set_member_states
from daemon.domain.campaigns.lifecycle import maybe_complete
from daemon.domain.campaigns.lifecycle import reopen_for_reply
from daemon.domain.campaigns.sending import _FAILS_MEMBER
from daemon.domain.campaigns.sending import member_message1_sent
from daemon.domain.campaigns.sending import unconfirmed_values
from daemon.store.db import is_postgres
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import InboundEvent
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import utcnow


@dataclass(frozen=True)
class SweepResult:
    messages: list[tuple[int, int]]  # (id, priority)
    events: list[int]
    campaigns: list[int]


def sweep(
    now=None,
    grace_s: float = 30.0,
    limit: int = 5000,
    include_queued: bool = True,
    in_queue: Collection[int] = (),
) -> SweepResult:
    """Rows the queue may have lost: due and not enqueued lately.

    Marks them enqueued now; the caller enqueues them. A row that is still in
    the queue as well is harmless: the claim lets one send through; rows the
    caller saw waiting there (`in_queue`) are left out. Rows abandoned in
    `sending` (lease expired) become unconfirmed here.
    """
    now = now or utcnow()
    stale = now - dt.timedelta(seconds=grace_s)
    running = Campaign.select(Campaign.id).where(
        Campaign.status == CampaignStatus.RUNNING
    )
    not_recent = Message.enqueued_at.is_null() | (Message.enqueued_at < stale)
    due = (Message.status == MessageStatus.QUEUED) & (
        Message.next_attempt_at.is_null() | (Message.next_attempt_at <= now)
    )
    # A lease that ran out belongs to a worker that died where nobody saw
    # it (another host, a supervisor killed with it): its request may have
    # left, so the row waits for evidence instead of being sent again.
    abandoned = (Message.status == MessageStatus.SENDING) & (
        Message.lease_expires_at < now
    )
    with database.atomic():
        Message.update(
            **unconfirmed_values(
                now, "worker lost mid-send (lease expired): unconfirmed"
            )
        ).where(abandoned).execute()
    messages = []
    if include_queued:
        messages = _take_lost(due & not_recent, running, now, limit, in_queue)
    events = [
        e.id
        for e in InboundEvent.select(InboundEvent.id)
        .where(
            InboundEvent.processed_at.is_null(),
            InboundEvent.dead_at.is_null(),
            InboundEvent.received_at < stale,
        )
        .order_by(InboundEvent.id)
        .limit(limit)
    ]
    # Members still waiting for their Message 1 row (not merely for its send).
    has_message1 = Message.select(Message.id).where(
        Message.campaign == CampaignContact.campaign,
        Message.contact == CampaignContact.contact,
        Message.kind == 1,
    )
    pending_members = CampaignContact.select(CampaignContact.campaign).where(
        CampaignContact.state == MemberState.PENDING, ~pw.fn.EXISTS(has_message1)
    )
    campaigns = [
        c.id
        for c in Campaign.select(Campaign.id).where(
            Campaign.status == CampaignStatus.RUNNING,
            Campaign.id.in_(pending_members),
        )
    ]
    return SweepResult(messages=messages, events=events, campaigns=campaigns)


def _take_lost(
    lost, running, now, limit: int, in_queue: Collection[int]
) -> list[tuple[int, int]]:
    """(id, priority) of lost rows not `in_queue`, marked enqueued now. A
    row whose pacing slot passed meanwhile takes a new one when it comes
    (Tasks._deliver_claimed: Pacer.slot_grace)."""
    with database.atomic():
        query = (
            Message.select(Message.id, Message.priority)
            .where(lost, Message.campaign.in_(running))
            .order_by(Message.id)
            .limit(limit)
        )
        if is_postgres():
            # Two leaders for a moment (lease handover) must not both take
            # the same batch.
            query = query.for_update(skip_locked=True)
        messages = [m for m in query.tuples() if m[0] not in in_queue]
        ids = [m[0] for m in messages]
        for start in range(0, len(ids), _CHUNK):
            Message.update(enqueued_at=now).where(
                Message.id.in_(ids[start : start + _CHUNK])
            ).execute()
    return messages


def running_campaign_ids() -> list[int]:
    return [
        c.id
        for c in Campaign.select(Campaign.id).where(
            Campaign.status == CampaignStatus.RUNNING
        )
    ]


def expire_interactions(window_h: float, now=None) -> int:
    """Message 1 older than the reply window with no reply: the contact expires."""
    now = now or utcnow()
    # A reply that arrived in time but is not processed yet still counts:
    # judge the window at the oldest unprocessed event, not at now. Dead
    # letters are left out: one event that can never be processed must not
    # stop every campaign's expiry.
    oldest_unprocessed = (
        InboundEvent.select(pw.fn.MIN(InboundEvent.received_at))
        .where(InboundEvent.processed_at.is_null(), InboundEvent.dead_at.is_null())
        .scalar()
    )
    if oldest_unprocessed is not None:
        now = min(now, oldest_unprocessed)
    cutoff = now - dt.timedelta(hours=window_h)
    with database.atomic():
        expiring = list(
            CampaignContact.select(CampaignContact.id, CampaignContact.campaign).where(
                CampaignContact.state == MemberState.MESSAGE_1_SENT,
                CampaignContact.message1_sent_at < cutoff,
            )
        )
        _set_member_states([m.id for m in expiring], MemberState.EXPIRED, now)
    for campaign_id in {m.campaign_id for m in expiring}:
        maybe_complete(campaign_id)
    return len(expiring)


def repair_members(now=None) -> int:
    """Members left behind their messages (a crash between two commits in an
    older version, or a webhook that moved the row but not the member)."""
    now = now or utcnow()
    sent = Message.select(Message.id).where(
        Message.campaign == CampaignContact.campaign,
        Message.contact == CampaignContact.contact,
        Message.status.in_(_SENT_OR_LATER),
    )
    fixed = (
        CampaignContact.update(state=MemberState.MESSAGE_2_SENT, updated_at=now)
        .where(
            CampaignContact.state == MemberState.INTERACTED,
            pw.fn.EXISTS(sent.where(Message.kind == 2)),
        )
        .execute()
    )
    fixed += member_message1_sent(
        now, pw.fn.EXISTS(sent.where(Message.kind == 1))
    ).execute()
    # A failed row whose member stayed open: record_failure's two commits
    # before 2026-12-03 (a kill between them); the campaign never completed.
    failed = Message.select(Message.id).where(
        Message.campaign == CampaignContact.campaign,
        Message.contact == CampaignContact.contact,
        Message.status == MessageStatus.FAILED,
    )
    for kind, open_states in _FAILS_MEMBER.items():
        fixed += (
            CampaignContact.update(state=MemberState.FAILED, updated_at=now)
            .where(
                CampaignContact.state.in_(open_states),
                pw.fn.EXISTS(failed.where(Message.kind == kind)),
            )
            .execute()
        )
    return fixed + _reopen_stranded()


def _reopen_stranded() -> int:
    """Completed campaigns with a member still open, running again: the
    completion checks the members, then completes, so a reply that took a
    member in between (its Message 2 queued) left it in a campaign where no
    send may be claimed. Running again, the Message 2 goes, and the
    campaign completes once it is settled (reopen_for_reply)."""
    open_member = CampaignContact.select(CampaignContact.id).where(
        CampaignContact.campaign == Campaign.id,
        CampaignContact.state.in_(tuple(MemberState.OPEN)),
    )
    stranded = Campaign.select(Campaign.id).where(
        Campaign.status == CampaignStatus.COMPLETED, pw.fn.EXISTS(open_member)
    )
    return sum(1 for (cid,) in stranded.tuples() if reopen_for_reply(cid))
