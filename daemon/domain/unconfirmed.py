"""Sends whose outcome is unknown: recorded as such, reconciled, settled.

A request that may have reached the provider (answer timed out or cut after
the request was written whole; the worker died or was killed while it was on
the wire) is never repeated on that alone: neither Wassenger nor Meta drops a
repeated request, so a blind re-send is a second WhatsApp message on
someone's phone. Such a row is `unconfirmed`, and:

- evidence confirms it: a status webhook that matches it (by reference,
  provider id or WhatsApp id; `campaigns.apply_status`, which stores the
  provider's ids it carries, as the lost answer would have) or a reply from
  the contact (`campaigns.handle_reply`);
- with no evidence after `provider.confirm_window_s`, `provider.unconfirmed`
  decides: "resend" (same reference) or "fail" (`campaign retry-failed`
  re-sends on the operator's word).

Rows that provably never left (claimed, not yet written) go back to `queued`
at once: the worker notes each request before writing it (runtime.InFlight),
so after a death the supervisor can tell the two apart.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw

from daemon import owners
from daemon.domain import campaigns
from daemon.store.models import CampaignContact
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

_CHUNK = 500


def mark(message, owner: str, reason: str, now=None) -> bool:
    """The attempt's outcome is unknown: unconfirmed, never retried blindly."""
    now = now or utcnow()
    return bool(
        Message.update(**campaigns.unconfirmed_values(now, f"unconfirmed: {reason}"))
        .where(campaigns.held_by(message, owner))
        .execute()
    )


@dataclass(frozen=True)
class Released:
    requeued: list[tuple[int, int]]  # (id, priority): never left, send at once
    unconfirmed: int  # may have left: wait for evidence


def release_dead_process(host: str, pid: int, in_flight: set[int] | None, now=None):
    """A dead worker's leased rows: unconfirmed if it had begun writing them
    (`in_flight`), queued again at once otherwise. `in_flight` None: its
    records are lost, so every row it held may have been on the wire."""
    now = now or utcnow()
    key = owners.process_key(host, pid)
    reason = "unconfirmed: worker died with the request on the wire"
    if in_flight is None:
        reason = "unconfirmed: worker died and its in-flight records are lost"
    with database.atomic():
        held = list(
            Message.select(Message.id, Message.priority)
            .where(campaigns.held_by_process(key))
            .tuples()
        )
        maybe_sent = [m for m, _ in held if in_flight is None or m in in_flight]
        for start in range(0, len(maybe_sent), _CHUNK):
            Message.update(**campaigns.unconfirmed_values(now, reason)).where(
                Message.id.in_(maybe_sent[start : start + _CHUNK]),
                campaigns.held_by_process(key),
            ).execute()
        campaigns.release_leases(key, now)
    requeued = [(m, p) for m, p in held if in_flight is not None and m not in in_flight]
    return Released(requeued=requeued, unconfirmed=len(maybe_sent))


def release_dead_processes(
    host: str,
    pid_alive: Callable[[int], bool],
    in_flight_of: Callable[[int], set | None],
) -> Released:
    """At supervisor start: the leases of this host's processes that are gone
    (a tree SIGKILLed with its supervisor). `in_flight_of(pid)` is None when
    that process's records are lost."""
    held = {
        m.lease_owner
        for m in Message.select(Message.lease_owner)
        .where(
            Message.status == MessageStatus.SENDING,
            Message.lease_owner.startswith(owners.process_key(host)),
        )
        .distinct()
    }
    pids = set()
    for owner in held:
        parsed = owners.parse(owner)
        if parsed and parsed[0] == host and not pid_alive(parsed[1]):
            pids.add(parsed[1])
    requeued: list[tuple[int, int]] = []
    unconfirmed = 0
    for pid in sorted(pids):
        released = release_dead_process(host, pid, in_flight_of(pid))
        requeued += released.requeued
        unconfirmed += released.unconfirmed
    return Released(requeued=requeued, unconfirmed=unconfirmed)


@dataclass(frozen=True)
class Settled:
    resent: list[tuple[int, int]]  # (id, priority), queued again
    failed: int


def settle(window_s: float, policy: str, now=None, limit: int = 5000) -> Settled:
    """Unconfirmed rows with no evidence after `window_s`: apply `policy`.

    A contact who opted out meanwhile, or whose campaign was cancelled, gets
    nothing more, whatever the policy: the row is cancelled, its first
    attempt's fate unknown.
    """
    now = now or utcnow()
    # Evidence that arrived in time but is not processed yet still counts (a
    # status webhook stored, its processing task lost with a worker or behind
    # a backlog): judge the window at the oldest unprocessed event, as
    # campaigns.expire_interactions does. Dead letters are left out.
    oldest_unprocessed = (
        InboundEvent.select(pw.fn.MIN(InboundEvent.received_at))
        .where(InboundEvent.processed_at.is_null(), InboundEvent.dead_at.is_null())
        .scalar()
    )
    judged_at = now if oldest_unprocessed is None else min(now, oldest_unprocessed)
    cutoff = judged_at - dt.timedelta(seconds=window_s)
    overdue = (Message.status == MessageStatus.UNCONFIRMED) & (
        Message.unconfirmed_at < cutoff
    )
    with database.atomic():
        confirmed_in = _confirm_replied()
        rows = list(
            Message.select(
                Message.id,
                Message.priority,
                Message.campaign,
                Message.contact,
                Message.kind,
            )
            .where(overdue)
            .order_by(Message.id)
            .limit(limit)
        )
        Message.update(
            status=MessageStatus.CANCELLED,
            error="unconfirmed, then the contact opted out: not re-sent",
        ).where(overdue, campaigns.contact_opted_out()).execute()
        # The claim never takes a cancelled campaign's rows: re-queued, they
        # would stay queued for good.
        Message.update(
            status=MessageStatus.CANCELLED,
            error="unconfirmed, then the campaign was cancelled: not re-sent",
        ).where(overdue, campaigns.campaign_cancelled()).execute()
        ids = [r.id for r in rows]
        for start in range(0, len(ids), _CHUNK):
            still = Message.id.in_(ids[start : start + _CHUNK]) & overdue
            if policy == "fail":
                Message.update(
                    status=MessageStatus.FAILED,
                    failed_at=now,
                    error=f"unconfirmed: no evidence within {window_s:g} s; "
                    "not re-sent (provider.unconfirmed = fail)",
                ).where(still).execute()
            else:
                Message.update(
                    status=MessageStatus.QUEUED,
                    next_attempt_at=None,
                    enqueued_at=now,
                    resends=pw.fn.COALESCE(Message.resends, 0) + 1,
                    error=f"re-sent: no evidence within {window_s:g} s "
                    "of an unconfirmed attempt",
                ).where(still).execute()
        # Rows confirmed or cancelled meanwhile were left alone above.
        end_status = MessageStatus.FAILED if policy == "fail" else MessageStatus.QUEUED
        moved = set()
        for start in range(0, len(ids), _CHUNK):
            moved |= {
                m.id
                for m in Message.select(Message.id).where(
                    Message.id.in_(ids[start : start + _CHUNK]),
                    Message.status == end_status,
                )
            }
        if policy == "fail":
            for row in rows:
                if row.id in moved:
                    campaigns.member_failed(
                        row.campaign_id, row.contact_id, now, row.kind
                    )
    for campaign_id in {r.campaign_id for r in rows} | confirmed_in:
        campaigns.maybe_complete(campaign_id)
    if moved:
        log.warning("%d unconfirmed sends -> %s (no evidence)", len(moved), end_status)
    if policy == "fail":
        return Settled(resent=[], failed=len(moved))
    return Settled(resent=[(r.id, r.priority) for r in rows if r.id in moved], failed=0)


def _confirm_replied() -> set[int]:
    """Unconfirmed Message 1 rows whose member replied: sent; their campaigns.

    A reply is the evidence (campaigns.handle_reply confirms an unconfirmed
    row), but one processed while the row was still `sending` (the provider
    answering later than the contact) leaves the row to its worker, whose
    timeout or death then makes it unconfirmed with the evidence already
    spent. Without this, "resend" sent Message 1 again to a contact who had
    answered it, and "fail" failed it for `campaign retry-failed` to re-send.
    """
    replied = CampaignContact.select(CampaignContact.id).where(
        CampaignContact.campaign == Message.campaign,
        CampaignContact.contact == Message.contact,
        CampaignContact.interacted_at.is_null(False),
    )
    confirmable = (
        (Message.status == MessageStatus.UNCONFIRMED)
        & (Message.kind == 1)
        & pw.fn.EXISTS(replied)
    )
    found = list(Message.select(Message.id, Message.campaign).where(confirmable))
    ids = [m.id for m in found]
    for start in range(0, len(ids), _CHUNK):
        Message.update(
            status=MessageStatus.SENT,
            sent_at=pw.fn.COALESCE(Message.sent_at, Message.unconfirmed_at),
            error=None,
        ).where(Message.id.in_(ids[start : start + _CHUNK]), confirmable).execute()
    if ids:
        log.info("%d unconfirmed Message 1 sends confirmed by a reply", len(ids))
    return {m.campaign_id for m in found}


def count() -> int:
    return (
        Message.select(pw.fn.COUNT(Message.id))
        .where(Message.status == MessageStatus.UNCONFIRMED)
        .scalar()
        or 0
    )
