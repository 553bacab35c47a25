"""The periodic jobs (kept by name from the original system).

The scheduler leader only enqueues ``run_job(name)`` on the ``default``
queue; a ``worker:default`` consumer runs `run(name, tasks, now)` here. Each
job is idempotent and takes `now` (naive UTC), so running one twice, late,
or with a test clock is harmless and needs no waiting.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from daemon.domain import campaigns
from daemon.domain import events
from daemon.domain import monitoring
from daemon.errors import InputError
from daemon.store.models import JobRun
from daemon.store.models import Lease
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database

log = logging.getLogger(__name__)

# The sweeper leaves alone rows enqueued this recently: they are most likely
# still in the queue. The 5-minute recovery looks further back.
SWEEP_GRACE_S = 30.0
RECOVER_GRACE_S = 60.0


def sync_monitoring(tasks, now: dt.datetime) -> str:
    """Persist today's counters, and yesterday's so the day closes complete."""
    yesterday = monitoring.persist_counters(now.date() - dt.timedelta(days=1), now)
    today = monitoring.persist_counters(now.date(), now)
    return f"today {_short(today)}; yesterday {_short(yesterday)}"


def reset_daily_monitoring(tasks, now: dt.datetime) -> str:
    """Close yesterday's counters and start today's at 0.

    Daily caps need no reset: the pacer counts them in the row for
    (today, ``cap:<device>``), so a new day is a new row (daemon/domain/pacing.py).
    """
    monitoring.persist_counters(now.date() - dt.timedelta(days=1), now)
    device = tasks.pacer.device
    created = monitoring.start_day(now.date(), now, devices=(device,))
    return f"started {now.date().isoformat()}: {created} counters created"


def cleanup_expired_locks(tasks, now: dt.datetime) -> str:
    """Remove leases and locks that dead processes left behind."""
    with database.atomic():
        # Pacing rows (`pacing:<device>`) have no expiry and hold the next
        # free send slot: `expires_at < now` never matches them.
        leases = (
            Lease.delete()
            .where(Lease.expires_at.is_null(False), Lease.expires_at < now)
            .execute()
        )
        # Only expired ones: a live send may be recording its result while a
        # webhook already moved the row to delivered.
        messages = (
            Message.update(lease_owner=None, lease_expires_at=None)
            .where(
                Message.status.in_(tuple(MessageStatus.FINAL)),
                Message.lease_owner.is_null(False),
                Message.lease_expires_at < now,
            )
            .execute()
        )
    # Huey locks exist only for tasks declared with lock_task (none today:
    # the row claim is our mutual exclusion); flush_locks() clears exactly
    # those. Whoever adds one must give it a TTL instead, because flushing a
    # lock that a live task on another host holds would break it.
    huey_locks = sum(len(q.flush_locks()) for q in tasks.queues.all())
    return f"leases {leases}, message leases {messages}, huey locks {huey_locks}"


def recover_interrupted_campaigns(tasks, now: dt.datetime) -> str:
    """Re-enqueue stuck rows, resume fan-outs, complete finished campaigns."""
    # Repaired first: a campaign it runs again has its rows enqueued below.
    repaired = campaigns.repair_members(now)
    found = tasks.sweep_once(now, grace_s=RECOVER_GRACE_S)
    completed = sum(
        1 for cid in campaigns.running_campaign_ids() if campaigns.maybe_complete(cid)
    )
    return f"{_short(found)}, repaired {repaired}, completed {completed}"


def sweep(tasks, now: dt.datetime) -> str:
    return _short(tasks.sweep_once(now, grace_s=SWEEP_GRACE_S))


def system_health_check(tasks, now: dt.datetime) -> str:
    report = monitoring.run_health_check(tasks.queues, tasks.provider, now)
    monitoring.record_health_check(report, now, cfg=tasks.cfg)
    # events:dead_letters, raised or resolved like the health:* alerts.
    dead = events.sync_alert(tasks.cfg)
    failing = report.failing()
    result = "ok" if not failing else "failing: " + ", ".join(failing)
    return result + (f"; {dead} dead letters" if dead else "")


def check_expired_interactions(tasks, now: dt.datetime) -> str:
    expired = campaigns.expire_interactions(tasks.cfg.campaigns.reply_window_h, now)
    return f"expired {expired}"


JOBS: dict[str, Callable[..., str]] = {
    "sync_monitoring": sync_monitoring,
    "reset_daily_monitoring": reset_daily_monitoring,
    "cleanup_expired_locks": cleanup_expired_locks,
    "recover_interrupted_campaigns": recover_interrupted_campaigns,
    "sweep": sweep,
    "system_health_check": system_health_check,
    "check_expired_interactions": check_expired_interactions,
}


def run(name: str, tasks, now: dt.datetime) -> str:
    """Run one job and record its result in `job_run`."""
    job = JOBS.get(name)
    if job is None:
        raise InputError(f"unknown job {name!r} (jobs: {', '.join(JOBS)})")
    try:
        result = job(tasks, now)
    except Exception as exc:
        _record(name, now, f"error: {type(exc).__name__}: {exc}")
        raise
    _record(name, now, result)
    log.debug("job %s: %s", name, result)
    return result


def _record(name: str, now: dt.datetime, result: str) -> None:
    text = f"{now.isoformat(timespec='seconds')}Z {result}"[:1000]
    # last_run_at is the scheduler's (set when it enqueues); a job run by
    # hand on a fresh database gets one too.
    JobRun.insert(job=name, last_run_at=now, last_result=text).on_conflict(
        conflict_target=[JobRun.job], update={JobRun.last_result: text}
    ).execute()


def _short(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())
