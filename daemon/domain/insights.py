"""Read-only figures the web console draws that no other view gives.

The campaign counters come from campaigns.campaign_summary (the figures of
`campaign show` and the admin API); this module adds what only a picture
needs: sends over a campaign's life in time buckets, its last failures, the
webhook events by type, and the alerts resolved lately. Every function only
reads.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import peewee as pw

from daemon.config import Config
from daemon.domain import pacing
from daemon.domain.campaigns import get_campaign
from daemon.domain.campaigns import message_dict
from daemon.store.db import is_postgres
from daemon.store.models import Alert
from daemon.store.models import CampaignStatus
from daemon.store.models import InboundEvent
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import duration_text
from daemon.store.models import iso_z
from daemon.store.models import utcnow

# A chart of more bars than this is unreadable at page width: a campaign
# gets the narrowest bucket of this list that keeps within it (then whole
# hours). The figures are drawn per minute whatever the bucket.
MAX_BUCKETS = 60
BUCKETS_S = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


@dataclass(frozen=True)
class SendSeries:
    """Sends accepted by the provider (rows with `sent_at`), per bucket."""

    start: dt.datetime  # naive UTC, the first bucket's start
    bucket_s: int
    message1: list[int]
    message2: list[int]

    @property
    def total(self) -> int:
        return sum(self.message1) + sum(self.message2)

    def per_minute(self, count: int) -> float:
        return count * 60.0 / self.bucket_s


def sends_over_time(campaign_id: int, now: dt.datetime | None = None) -> SendSeries:
    """The campaign's sends from its start to its end (or now), in buckets.

    One GROUP BY over the campaign's rows that have a `sent_at` (it reads
    each of them, so a big campaign's page costs more); buckets are counted
    in epoch seconds from the first one, the same on SQLite and PostgreSQL.
    """
    campaign = get_campaign(campaign_id)
    now = now or utcnow()
    first = (
        Message.select(pw.fn.MIN(Message.sent_at))
        .where(Message.campaign == campaign_id, Message.sent_at.is_null(False))
        .scalar()
    )
    if isinstance(first, str):  # SQLite returns MIN() over a datetime as text
        first = dt.datetime.fromisoformat(first)
    start = campaign.started_at or first or now
    if first is not None and first < start:
        start = first  # rows sent before a restart of the campaign
    end = max(campaign.finished_at or now, start + dt.timedelta(seconds=1))
    span = int((end - start).total_seconds()) + 1
    fitting = [b for b in BUCKETS_S if span <= b * MAX_BUCKETS]
    bucket_s = fitting[0] if fitting else 3600 * -(-span // (3600 * MAX_BUCKETS))
    # Buckets start on round times: a multiple of the bucket, or the minute.
    start = start.replace(microsecond=0)
    origin = int(start.replace(tzinfo=dt.UTC).timestamp())
    start -= dt.timedelta(seconds=origin % min(bucket_s, 60))
    origin -= origin % min(bucket_s, 60)
    count = max(1, -(-(int((end - start).total_seconds()) + 1) // bucket_s))
    series = {1: [0] * count, 2: [0] * count}
    p = database.param
    if is_postgres():
        epoch = "EXTRACT(EPOCH FROM sent_at)"
        bucket = f"FLOOR(({epoch} - {p}) / {p})"
    else:
        bucket = f"(CAST(strftime('%s', sent_at) AS INTEGER) - {p}) / {p}"
    sql = (
        f"SELECT {bucket} AS b, kind, COUNT(*) FROM message "
        f"WHERE campaign_id = {p} AND sent_at IS NOT NULL AND sent_at >= {p} "
        "GROUP BY b, kind"
    )
    since = start if is_postgres() else str(start)  # stored as text on SQLite
    rows = database.execute_sql(sql, [origin, bucket_s, campaign_id, since])
    for index, kind, n in rows.fetchall():
        index = int(index)
        if kind in series and index >= 0:
            values = series[kind]
            if index >= len(values):  # sent after `end` (a clock step)
                values.extend([0] * (index + 1 - len(values)))
            values[index] += n
    width = max(len(series[1]), len(series[2]))
    for values in series.values():
        values.extend([0] * (width - len(values)))
    return SendSeries(start, bucket_s, series[1], series[2])


def last_failures(campaign_id: int, limit: int = 20) -> list[dict]:
    """The campaign's failed messages, newest failure first, with the reason."""
    rows = (
        Message.select()
        .where(Message.campaign == campaign_id, Message.status == MessageStatus.FAILED)
        .order_by(Message.failed_at.desc(nulls="LAST"), Message.id.desc())
        .limit(limit)
    )
    return [message_dict(m) for m in rows]


def event_counts() -> list[dict]:
    """Stored webhook events by provider and type: total, processed, pending, dead."""
    rows = (
        InboundEvent.select(
            InboundEvent.provider,
            InboundEvent.event_type,
            pw.fn.COUNT(InboundEvent.id),
            pw.fn.COUNT(InboundEvent.processed_at),
            pw.fn.COUNT(InboundEvent.dead_at),
        )
        .group_by(InboundEvent.provider, InboundEvent.event_type)
        .order_by(InboundEvent.provider, InboundEvent.event_type)
        .tuples()
    )
    return [
        {
            "provider": provider,
            "event_type": event_type or "(none)",
            "total": total,
            "processed": processed,
            "dead": dead,
            "pending": total - processed - dead,
        }
        for provider, event_type, total, processed, dead in rows
    ]


def resolved_alerts(limit: int = 10) -> list[dict]:
    """The alerts resolved last, newest first."""
    rows = (
        Alert.select()
        .where(Alert.resolved_at.is_null(False))
        .order_by(Alert.resolved_at.desc())
        .limit(limit)
    )
    return [
        {
            "key": a.key,
            "severity": a.severity,
            "message": a.message,
            "raised_at": iso_z(a.raised_at, "seconds"),
            "resolved_at": iso_z(a.resolved_at, "seconds"),
        }
        for a in rows
    ]


# --------------------------------------------------------------- the funnel

_SENT = (MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.READ)


@dataclass(frozen=True)
class Funnel:
    """A campaign's funnel from its summary: (key, label, count) rows."""

    stages: list[tuple[str, str, int]]  # each a subset of the one before
    beside: list[tuple[str, str, int]]  # where the others went


def funnel(summary: dict) -> Funnel:
    """targeted -> sent -> delivered -> read -> replied -> Message 2 sent.

    From campaigns.campaign_summary: Message 1 rows by status, members by
    state. "replied" is the members who replied and did not opt out (state
    interacted or message_2_sent); a STOP counts under "opted out".
    """
    m1 = summary["messages"]["message1"]
    m2 = summary["messages"]["message2"]
    members = summary["members"]
    stages = [
        ("targeted", "targeted", summary["contacts"]),
        ("sent", "Message 1 sent", sum(m1.get(s, 0) for s in _SENT)),
        (
            "delivered",
            "delivered",
            m1.get(MessageStatus.DELIVERED, 0) + m1.get(MessageStatus.READ, 0),
        ),
        ("read", "read", m1.get(MessageStatus.READ, 0)),
        (
            "replied",
            "replied",
            members.get("interacted", 0) + members.get("message_2_sent", 0),
        ),
        ("message2", "Message 2 sent", sum(m2.get(s, 0) for s in _SENT)),
    ]
    beside = [
        ("expired", "expired (no reply)", members.get("expired", 0)),
        ("opted_out", "opted out", members.get("opted_out", 0)),
        ("failed", "failed", members.get("failed", 0)),
        ("skipped", "skipped (not on WhatsApp)", members.get("skipped", 0)),
        ("unconfirmed", "unconfirmed", summary["unconfirmed"]["waiting"]),
    ]
    return Funnel(stages, beside)


# ------------------------------------------------------------------- the ETA

DONE = (CampaignStatus.COMPLETED, CampaignStatus.CANCELLED)


def eta_text(cfg: Config, summary: dict, now: dt.datetime) -> str:
    """Message 1 still to send, and when the last goes out at the pacing limits."""
    left = summary["members"].get(MemberState.PENDING, 0)
    status = summary["status"]
    if status in DONE:
        finished = summary.get("finished_at") or ""
        # "2026-12-03T15:58:03.066696Z" -> "2026-12-03 15:58:03 UTC"
        return status + (
            f" at {finished[:19].replace('T', ' ')} UTC" if finished else ""
        )
    limits = pacing_limits(cfg)
    if left == 0:
        return (
            "every Message 1 is out: waiting for replies and Message 2 (members "
            f"expire {cfg.campaigns.reply_window_h:g} h after their Message 1)"
        )
    if status != CampaignStatus.RUNNING:
        return f"{left} Message 1 to send; no ETA while {status} ({limits})"
    used = pacing.sent_today(cfg.provider.device, now) if cfg.pacing.daily_cap else 0
    eta = pacing.message1_eta(cfg.pacing, left, now, used)
    if eta is None:
        when = f"not within {pacing.ETA_HORIZON_DAYS} days"
    elif eta - now < dt.timedelta(seconds=1):
        when = "now: no pacing limit holds them back"
    else:
        when = f"{_clock(eta, now)} (in {duration_text((eta - now).total_seconds())})"
    return f"{left} Message 1 to send, the last by {when}; {limits}"


def pacing_limits(cfg: Config) -> str:
    """The pacing limits in words: rate, daily cap, send window."""
    p = cfg.pacing
    parts = [f"{p.per_minute:g}/min" if p.per_minute else "no rate limit"]
    parts.append(f"cap {p.daily_cap}/day" if p.daily_cap else "no daily cap")
    if p.window_start != p.window_end:
        parts.append(f"window {p.window_start}-{p.window_end} {p.timezone}")
    return ", ".join(parts)


def _clock(at: dt.datetime, now: dt.datetime) -> str:
    if at.date() == now.date():
        return at.strftime("%H:%M:%S UTC")
    return at.strftime("%Y-%m-%d %H:%M UTC")
