"""Read-only views of campaigns and messages (CLI, admin API, status)."""

from __future__ import annotations

import logging

import peewee as pw

from daemon.domain.campaigns.lifecycle import get_campaign
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import iso_z

log = logging.getLogger(__name__)

_COUNT_ALL = pw.fn.COUNT(pw.SQL("*"))


def campaign_summary(campaign_id: int) -> dict:
    campaign = get_campaign(campaign_id)
    # One COUNT(*) per state (and per kind and status), each a range of the
    # (campaign, state, id) or (campaign, kind, status) index (m0003): half
    # the time of a GROUP BY over the same entries, which decodes every one
    # (~0.1 s instead of ~0.35 s at a million members on SQLite).
    # The biggest count right after a fan-out (a million pending members, a
    # million queued Message 1) is the campaign's total minus the others
    # (m0007): counting it read every entry, and on PostgreSQL visited every
    # row too until VACUUM marks the pages all-visible (0.7 s at a million).
    members = _counts(
        "campaign_contact",
        ("state",),
        [(s,) for s in _values(MemberState)],
        campaign_id,
        derive=((MemberState.PENDING,), "members_total"),
    )
    keys = [(k, s) for k in (1, 2) for s in _values(MessageStatus)]
    messages: dict[str, dict[str, int]] = {"message1": {}, "message2": {}}
    for (kind, status), count in _counts(
        "message",
        ("kind", "status"),
        keys,
        campaign_id,
        derive=((1, MessageStatus.QUEUED), "message1_total"),
    ).items():
        messages[f"message{kind}"][status] = count
    return {
        **_campaign_fields(campaign),
        "contacts": sum(members.values()),
        "members": members,
        "messages": messages,
        "unconfirmed": _unconfirmed_summary(campaign_id, messages),
    }


# The 0 of a partial index's condition (m0005, m0008), written into the SQL:
# as a bound parameter, a plan made for any value (psycopg prepares a query
# run 5 times on one connection; PostgreSQL may then keep a generic plan)
# cannot prove `failures > $1` implies `failures > 0`, and reads the
# campaign's whole range instead.
_ZERO = pw.SQL("0")


def _unconfirmed_summary(campaign_id: int, messages: dict) -> dict:
    """Sends whose outcome was unknown: waiting for evidence now, re-sent for
    want of it (each may be a second message on a phone), failed by policy."""
    waiting = sum(m.get(MessageStatus.UNCONFIRMED, 0) for m in messages.values())
    # Two index ranges instead of one OR, which read every row of the
    # campaign (1.1 s at a million): re-sent rows through the partial index
    # on resends > 0 (m0005), failed rows through (campaign, status).
    ours = Message.campaign == campaign_id
    by_policy = Message.error.startswith("unconfirmed:")
    failed_row = (Message.status == MessageStatus.FAILED) & Message.error.is_null(False)
    resent, resent_by_policy = (
        Message.select(
            pw.fn.COALESCE(pw.fn.SUM(Message.resends), 0),
            pw.fn.COUNT(Message.id).filter(by_policy & ~failed_row),
        )
        .where(ours, Message.resends > _ZERO)
        .tuples()
        .first()
    ) or (0, 0)
    failed = (
        Message.select(Message.id)
        .where(ours, Message.status == MessageStatus.FAILED, by_policy)
        .count()
    )
    return {
        "waiting": waiting,
        "resent": int(resent or 0),
        "failed": int(failed) + int(resent_by_policy or 0),
    }


def _values(states: type) -> list[str]:
    """The state names a MemberState / MessageStatus-like class defines."""
    return sorted(
        value
        for name, value in vars(states).items()
        if name.isupper() and isinstance(value, str)
    )


def _counts(
    table: str,
    columns: tuple[str, ...],
    keys: list[tuple],
    campaign_id,
    derive: tuple[tuple, str] | None = None,
):
    """{key: count} of a campaign's rows per value of `columns`, zeros left out.

    `derive` (key, total column of campaign): when that total is known, the
    key's count is the total minus the counts of the keys that share all its
    columns but the last, all read by one statement (one snapshot); when it is NULL
    the key is counted like the others.
    """
    p = database.param
    where = " AND ".join(f"{column} = {p}" for column in columns)
    one = f"SELECT COUNT(*) FROM {table} WHERE campaign_id = {p} AND {where}"
    parts, params = [], []
    total_sql = ""
    if derive is not None:
        total_sql = f"(SELECT {derive[1]} FROM campaign WHERE id = {p})"
        parts.append(f"SELECT -1, {total_sql}")
        params.append(campaign_id)
    for i, key in enumerate(keys):
        if derive is not None and key == derive[0]:
            # CASE evaluates the count only when the total is not known.
            parts.append(f"SELECT {i}, CASE WHEN {total_sql} IS NULL THEN ({one}) END")
            params += [campaign_id, campaign_id, *key]
        else:
            parts.append(f"SELECT {i}, ({one})")
            params += [campaign_id, *key]
    rows = database.execute_sql(" UNION ALL ".join(parts), params).fetchall()
    counts = {keys[i]: count for i, count in rows if i >= 0 and count is not None}
    total = next((count for i, count in rows if i == -1), None)
    if derive is not None and total is not None:
        key = derive[0]
        others = sum(n for k, n in counts.items() if k[:-1] == key[:-1] and k != key)
        counts[key] = total - others
        if counts[key] < 0:  # cannot happen while the total is kept right
            log.warning("campaign %s: %s is behind; counting", campaign_id, derive[1])
            counts[key] = database.execute_sql(one, [campaign_id, *key]).fetchone()[0]
    single = len(columns) == 1
    return {key[0] if single else key: n for key, n in counts.items() if n}


def _campaign_fields(campaign: Campaign) -> dict:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "status": campaign.status,
        "status_reason": campaign.status_reason,
        "message1": campaign.message1,
        "message2": campaign.message2,
        "created_at": iso_z(campaign.created_at),
        "started_at": iso_z(campaign.started_at),
        "finished_at": iso_z(campaign.finished_at),
    }


def list_campaigns() -> list[dict]:
    counts = dict(
        CampaignContact.select(CampaignContact.campaign, _COUNT_ALL)
        .group_by(CampaignContact.campaign)
        .tuples()
    )
    return [
        {**_campaign_fields(c), "contacts": counts.get(c.id, 0)}
        for c in Campaign.select().order_by(Campaign.id)
    ]


def message_dict(message: Message) -> dict:
    return {
        "id": message.id,
        "campaign_id": message.campaign_id,
        "contact_id": message.contact_id,
        "phone": message.phone,
        "kind": message.kind,
        "status": message.status,
        "attempts": message.attempts,
        "error": message.error,
        "idempotency_key": message.idempotency_key,
        "provider_id": message.provider_id,
        "created_at": iso_z(message.created_at),
        "sent_at": iso_z(message.sent_at),
        "delivered_at": iso_z(message.delivered_at),
        "read_at": iso_z(message.read_at),
        "failed_at": iso_z(message.failed_at),
        "next_attempt_at": iso_z(message.next_attempt_at),
    }


def list_messages(
    *,
    campaign_id: int | None = None,
    contact_id: int | None = None,
    status: str | None = None,
    kind: int | None = None,
    after_id: int | None = None,
    offset: int | None = None,
    limit: int = 50,
) -> list[Message]:
    """Messages by id, filtered; the admin API and `campaignd messages list`."""
    query = Message.select().order_by(Message.id)
    if campaign_id is not None:
        query = query.where(Message.campaign == campaign_id)
    if contact_id is not None:
        query = query.where(Message.contact == contact_id)
    if status is not None:
        query = query.where(Message.status == status)
    if kind is not None:
        query = query.where(Message.kind == kind)
    if after_id is not None:
        query = query.where(Message.id > after_id)
    if offset:
        query = query.offset(offset)
    return list(query.limit(limit))


def sending_details(campaign_id: int) -> dict:
    """What `campaign show` adds about sending: rows waiting for a retry and
    the next attempt, and the last failure with its reason. Each question
    reads a partial index holding only its rows (m0008), not every queued or
    failed row of the campaign."""
    queued = (Message.campaign == campaign_id, Message.status == MessageStatus.QUEUED)
    retrying = (
        Message.select(Message.id).where(*queued, Message.failures > _ZERO).count()
    )
    next_at = (
        Message.select(pw.fn.MIN(Message.next_attempt_at))
        .where(*queued, Message.next_attempt_at.is_null(False))
        .scalar()
    )
    last = (
        Message.select(Message.phone, Message.kind, Message.error, Message.failed_at)
        .where(
            Message.campaign == campaign_id,
            Message.status == MessageStatus.FAILED,
            Message.failed_at.is_null(False),
        )
        .order_by(Message.failed_at.desc())
        .first()
    )
    last_failure = None
    if last is not None:
        last_failure = {
            "at": iso_z(last.failed_at),
            "phone": last.phone,
            "kind": last.kind,
            "error": last.error,
        }
    return {
        "retrying": retrying,
        "next_attempt_at": iso_z(Message.next_attempt_at.python_value(next_at)),
        "last_failure": last_failure,
    }
