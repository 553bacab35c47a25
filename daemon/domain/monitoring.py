"""Daily counters and the system health check.

Counters are computed from the rows themselves (a message counts as sent on
the day of its ``sent_at``, and so on), so they are right after any crash and
recomputing a day is idempotent: the hourly job upserts today's and
yesterday's values into ``daily_counter``. Daily caps live in the same table
under ``cap:<device>`` and are keyed by day too, so a new day starts from
zero without anything being reset.

The health check looks at the database, the queue backend, the provider, the
error rate, the backlog and the status webhooks (sends going out while no
status webhook came for an hour: a provider whose status webhooks are not
registered, so unconfirmed sends are never reconciled); it stores one
``health_check`` row per run and raises or resolves one alert per failing part
(``health:database`` ... ``health:status_webhooks``).

Readers (status socket, API): `today_counters()`, `counters_for()`,
`last_health_check()`. Every function takes `now` (naive UTC) for tests.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw

from daemon.config import AlertsConfig
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import DailyCounter
from daemon.store.models import HealthCheck
from daemon.store.models import InboundEvent
from daemon.store.models import Interaction
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.models import iso_z
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

COUNTER_NAMES = (
    "sent",
    "delivered",
    "read",
    "failed",
    "message1_sent",
    "message2_sent",
    "replies",
    "opt_outs",
    "expired",
)
CAP_PREFIX = "cap:"
HEALTH_PARTS = (
    "database",
    "queue",
    "provider",
    "error_rate",
    "backlog",
    "status_webhooks",
)
# Point probes (one call each): a single slow answer fails them, so their
# alert is raised only when the failure lasted alerts.down_after_s, and
# resolved only after this many passing checks in a row (no flapping).
DEBOUNCED_PARTS = ("provider",)
RESOLVE_AFTER_OK_CHECKS = 3
# Health rows are written every two minutes; a week is plenty to look back.
HEALTH_KEEP_DAYS = 7


# ---------------------------------------------------------------- counters


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time())
    return start, start + dt.timedelta(days=1)


def _in(column, day: dt.date):
    start, end = day_bounds(day)
    return (column >= start) & (column < end)


def compute_counters(day: dt.date) -> dict[str, int]:
    """The day's counters, counted from the rows' timestamps."""

    def count(query) -> int:
        return query.count()

    messages = Message.select(Message.id)
    return {
        "sent": count(messages.where(_in(Message.sent_at, day))),
        "delivered": count(messages.where(_in(Message.delivered_at, day))),
        "read": count(messages.where(_in(Message.read_at, day))),
        "failed": count(messages.where(_in(Message.failed_at, day))),
        "message1_sent": count(
            messages.where(Message.kind == 1, _in(Message.sent_at, day))
        ),
        "message2_sent": count(
            messages.where(Message.kind == 2, _in(Message.sent_at, day))
        ),
        "replies": count(
            Interaction.select(Interaction.id).where(_in(Interaction.received_at, day))
        ),
        "opt_outs": count(
            Contact.select(Contact.id).where(_in(Contact.opted_out_at, day))
        ),
        # A member's updated_at is when it reached its state, and expired is
        # final, so this is the day it expired.
        "expired": count(
            CampaignContact.select(CampaignContact.id).where(
                CampaignContact.state == MemberState.EXPIRED,
                _in(CampaignContact.updated_at, day),
            )
        ),
    }


def persist_counters(day: dt.date, now: dt.datetime) -> dict[str, int]:
    """Compute the day's counters and upsert them; returns what was written."""
    values = compute_counters(day)
    rows = [
        {"day": day, "name": name, "value": value, "updated_at": now}
        for name, value in values.items()
    ]
    with database.atomic():
        DailyCounter.insert_many(rows).on_conflict(
            conflict_target=[DailyCounter.day, DailyCounter.name],
            preserve=[DailyCounter.value, DailyCounter.updated_at],
        ).execute()
    return values


def start_day(day: dt.date, now: dt.datetime, devices: tuple[str, ...] = ()) -> int:
    """Create the day's counter rows at 0 (and caps); existing rows are kept."""
    names = list(COUNTER_NAMES) + [f"{CAP_PREFIX}{d}" for d in devices]
    rows = [{"day": day, "name": n, "value": 0, "updated_at": now} for n in names]
    with database.atomic():
        before = DailyCounter.select().where(DailyCounter.day == day).count()
        DailyCounter.insert_many(rows).on_conflict_ignore().execute()
        after = DailyCounter.select().where(DailyCounter.day == day).count()
    return after - before


def counters_for(day: dt.date) -> dict[str, int]:
    """The persisted counters of a day (caps included, as ``cap:<device>``)."""
    return dict(
        DailyCounter.select(DailyCounter.name, DailyCounter.value)
        .where(DailyCounter.day == day)
        .tuples()
    )


def today_counters(now: dt.datetime | None = None) -> dict[str, int]:
    """Today's persisted counters (UTC day), as of the last sync."""
    return counters_for((now or utcnow()).date())


# ---------------------------------------------------------------- health


@dataclass(frozen=True)
class HealthThresholds:
    # Failed share of the sends of the last `error_window_s`, alerting
    # only once there are enough sends to mean something.
    error_rate: float = 0.25
    error_min_samples: int = 20
    error_window_s: float = 3600.0
    # A queued message of a running campaign, due this long ago and still
    # not sent, means the workers are not keeping up (or not running).
    backlog_after_s: float = 600.0
    backlog_max: int = 0
    # Sends accepted in the last `status_silence_s` while no status webhook
    # arrived in that time: the provider does not report statuses (webhooks
    # not registered, or lost). Only sends at least `status_grace_s` old
    # count, so a campaign starting after a quiet hour does not alert before
    # its first statuses had time to come (they come within seconds).
    status_silence_s: float = 3600.0
    status_grace_s: float = 900.0


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    details: dict

    def failing(self) -> list[str]:
        return [p for p in HEALTH_PARTS if not self.details.get(p, {}).get("ok")]


def _guarded(check: Callable[[], dict]) -> dict:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a failing check is a result
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def check_database() -> dict:
    started = time.perf_counter()
    database.execute_sql("SELECT 1").fetchall()
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1e3, 2)}


def check_queues(queues) -> dict:
    started = time.perf_counter()
    depths = queues.depths()
    return {
        "ok": True,
        "depths": depths,
        "latency_ms": round((time.perf_counter() - started) * 1e3, 2),
    }


def check_provider(provider) -> dict:
    status = provider.device_status()
    return {"ok": bool(status.get("ok")), "detail": str(status.get("detail", ""))}


def check_error_rate(now: dt.datetime, th: HealthThresholds) -> dict:
    since = now - dt.timedelta(seconds=th.error_window_s)
    failed = (
        Message.select(Message.id)
        .where(Message.status == MessageStatus.FAILED, Message.failed_at >= since)
        .count()
    )
    sent = (
        Message.select(Message.id)
        .where(Message.status != MessageStatus.FAILED, Message.sent_at >= since)
        .count()
    )
    total = sent + failed
    rate = failed / total if total else 0.0
    ok = total < th.error_min_samples or rate <= th.error_rate
    return {"ok": ok, "rate": round(rate, 4), "sent": sent, "failed": failed}


def check_backlog(now: dt.datetime, th: HealthThresholds) -> dict:
    cutoff = now - dt.timedelta(seconds=th.backlog_after_s)
    running = Campaign.select(Campaign.id).where(
        Campaign.status == CampaignStatus.RUNNING
    )
    due_since = pw.fn.COALESCE(Message.next_attempt_at, Message.created_at)
    late = (
        Message.status == MessageStatus.QUEUED,
        Message.campaign.in_(running),
        due_since < cutoff,
    )
    count = Message.select(Message.id).where(*late).count()
    oldest = None
    if count:
        oldest = Message.select(pw.fn.MIN(due_since)).where(*late).scalar()
    return {
        "ok": count <= th.backlog_max,
        "late": count,
        "oldest_due": iso_z(oldest, "seconds"),
        "after_s": th.backlog_after_s,
    }


def _is_status_event():
    """inbound_event rows that report on an outbound message (event_type_of):
    Wassenger's message:out:* (ack, sent, delivered, read, failed), Meta's
    status:<status>."""
    return InboundEvent.event_type.startswith(
        "message:out:"
    ) | InboundEvent.event_type.startswith("status:")


def check_status_webhooks(now: dt.datetime, th: HealthThresholds) -> dict:
    since = now - dt.timedelta(seconds=th.status_silence_s)
    until = now - dt.timedelta(seconds=th.status_grace_s)
    sends = (
        Message.select(Message.id)
        .where(Message.sent_at >= since, Message.sent_at <= until)
        .count()
    )
    last = None
    if sends:
        # Through the processed_at index: an hour of events at most, plus
        # the (few) not processed yet.
        recent = (InboundEvent.processed_at >= since) | (
            InboundEvent.processed_at.is_null()
        )
        last = (
            InboundEvent.select(pw.fn.MAX(InboundEvent.received_at))
            .where(recent, InboundEvent.received_at >= since, _is_status_event())
            .scalar()
        )
    return {
        "ok": not sends or last is not None,
        "sends": sends,
        "last_status_at": iso_z(last, "seconds"),
        "silence_s": th.status_silence_s,
    }


def run_health_check(
    queues, provider, now: dt.datetime, th: HealthThresholds = HealthThresholds()
) -> HealthReport:
    """Every check, each caught on its own: one broken part fails only itself."""
    details = {
        "database": _guarded(check_database),
        "queue": _guarded(lambda: check_queues(queues)),
        "provider": _guarded(lambda: check_provider(provider)),
        "error_rate": _guarded(lambda: check_error_rate(now, th)),
        "backlog": _guarded(lambda: check_backlog(now, th)),
        "status_webhooks": _guarded(lambda: check_status_webhooks(now, th)),
    }
    return HealthReport(all(d.get("ok") for d in details.values()), details)


def alert_message(part: str, result: dict) -> str:
    if "error" in result:
        return f"health check: {part} failing: {result['error']}"
    if part == "provider":
        return f"health check: provider not reachable: {result.get('detail')}"
    if part == "error_rate":
        return (
            f"health check: {result['failed']} of {result['failed'] + result['sent']}"
            f" sends failed in the last hour ({result['rate']:.0%})"
        )
    if part == "backlog":
        return (
            f"health check: {result['late']} queued messages due for more than "
            f"{result['after_s']:.0f}s (oldest due {result['oldest_due']})"
        )
    if part == "status_webhooks":
        return (
            f"health check: {result['sends']} sends accepted in the last "
            f"{result['silence_s'] / 60:.0f} min and no status webhook: register "
            "the provider's status webhooks (sent/delivered/read), or unconfirmed "
            "sends are never reconciled"
        )
    return f"health check: {part} failing"


def record_health_check(report: HealthReport, now: dt.datetime, cfg=None) -> None:
    """Store the report, then raise or resolve one alert per part."""
    from daemon.domain import alerts

    try:
        HealthCheck.create(checked_at=now, ok=report.ok, details=report.details)
        HealthCheck.delete().where(
            HealthCheck.checked_at < now - dt.timedelta(days=HEALTH_KEEP_DAYS)
        ).execute()
    except pw.DatabaseError as exc:
        # The database is what failed: the alert table is out of reach too.
        log.critical("health check could not be stored: %s", exc)
        return
    down_after_s = (cfg.alerts if cfg is not None else AlertsConfig()).down_after_s
    for part in HEALTH_PARTS:
        result = report.details.get(part, {})
        key = f"health:{part}"
        if part in DEBOUNCED_PARTS:
            verdict = _debounced(part, bool(result.get("ok")), now, down_after_s)
        else:
            verdict = "ok" if result.get("ok") else "failing"
        if verdict == "ok":
            alerts.resolve_alert(key, cfg=cfg, message=f"health check: {part} ok")
        elif verdict == "failing":
            alerts.raise_alert(key, alert_message(part, result), cfg=cfg)


def _part_ok(row_details, part: str) -> bool:
    return bool((row_details or {}).get(part, {}).get("ok"))


def _debounced(part: str, ok: bool, now: dt.datetime, down_after_s: float) -> str:
    """ "failing", "ok" or "unsure" for a point probe, from the stored checks.

    Failing once it has failed on every check for `down_after_s` (the check
    just stored included); ok once it passed RESOLVE_AFTER_OK_CHECKS checks in
    a row; unsure in between, when the alert stays as it is.
    """
    if ok:
        recent = (
            HealthCheck.select(HealthCheck.details)
            .where(HealthCheck.checked_at <= now)
            .order_by(HealthCheck.checked_at.desc())
            .limit(RESOLVE_AFTER_OK_CHECKS)
        )
        passed = [_part_ok(r.details, part) for r in recent]
        return (
            "ok" if len(passed) == RESOLVE_AFTER_OK_CHECKS and all(passed) else "unsure"
        )
    cutoff = now - dt.timedelta(seconds=down_after_s)
    # Every check after the cutoff failed, and so did the last one at or
    # before it: then the failure has lasted at least down_after_s.
    since = HealthCheck.select(HealthCheck.details).where(
        HealthCheck.checked_at > cutoff, HealthCheck.checked_at <= now
    )
    if any(_part_ok(r.details, part) for r in since):
        return "unsure"
    before = (
        HealthCheck.select(HealthCheck.details)
        .where(HealthCheck.checked_at <= cutoff)
        .order_by(HealthCheck.checked_at.desc())
        .first()
    )
    if before is None or _part_ok(before.details, part):
        return "unsure"
    return "failing"


def last_health_check() -> dict | None:
    """The newest stored health check, for the status socket and the API."""
    row = HealthCheck.select().order_by(HealthCheck.checked_at.desc()).first()
    if row is None:
        return None
    checked_at = iso_z(row.checked_at, "seconds")
    return {"checked_at": checked_at, "ok": row.ok, "details": row.details}
