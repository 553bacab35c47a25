"""WhatsApp number checks as rows (`number_check`, one per contact).

A check is requested (pending, with the time it may run), claimed by a
verification worker when due, and finished with its outcome: valid (on
WhatsApp), invalid (not), or unknown (the provider could not tell: errors
past the retries, a number it refused, a provider without number checks such
as Meta, or a contact who opted out before the check ran). The queue entry
carries only the row's id: an entry lost with a worker or a queue is found
again by the sweeper (`take_lost`), like a lost send.

Pacing: `campaigns.verify_per_minute` across every pending check. A request
takes the slots after the last pending check not tried yet, one every
60/verify_per_minute seconds, so two requests never run at twice the pace.
A retry takes its own time (the backoff), outside that sequence.

Requesting a contact whose check is pending keeps that check (same row, same
time); requesting a finished one makes it pending again. Opted-out contacts
are not checked. `Contact.wa_status` / `wa_checked_at` stay the verdict the
fan-out reads: a finished valid/invalid check writes them; a pending re-check,
or one that ends unknown, leaves the previous verdict in place.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import peewee as pw

from daemon.store.db import is_postgres
from daemon.store.models import CampaignContact
from daemon.store.models import CheckStatus
from daemon.store.models import Contact
from daemon.store.models import NumberCheck
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import iso_z

_CHUNK = 500
# PostgreSQL: requests take their slots one at a time (SQLite's IMMEDIATE
# transactions already do). Any constant unlikely to be another lock's.
_PACING_LOCK_ID = 0x6E756D63  # "numc"
COUNT_KEYS = (*CheckStatus.ALL, "unchecked")


@dataclass(frozen=True)
class Requested:
    # (check id, due_at) of each check made pending: enqueue it for due_at.
    queued: list[tuple[int, dt.datetime]]
    already_pending: int = 0
    opted_out: int = 0
    missing: int = 0


@dataclass(frozen=True)
class Claimed:
    id: int
    contact_id: int
    phone: str
    attempts: int


def spacing(per_minute: float) -> dt.timedelta:
    return dt.timedelta(seconds=60.0 / per_minute)


# --- requests -------------------------------------------------------------------


def request(
    contact_ids: Iterable[int], per_minute: float, now: dt.datetime
) -> Requested:
    """Make the checks of `contact_ids` pending (see the module's rules)."""
    ids = list(dict.fromkeys(contact_ids))
    step = spacing(per_minute)
    queued: list[tuple[int, dt.datetime]] = []
    kept = opted = missing = 0
    with database.atomic():
        if is_postgres():
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_PACING_LOCK_ID,))
        slot = _next_slot(now, step)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            found = {
                cid: (opted_out_at, status)
                for cid, opted_out_at, status in Contact.select(
                    Contact.id, Contact.opted_out_at, NumberCheck.status
                )
                .join(
                    NumberCheck,
                    pw.JOIN.LEFT_OUTER,
                    on=(NumberCheck.contact == Contact.id),
                )
                .where(Contact.id.in_(chunk))
                .tuples()
            }
            due: dict[int, dt.datetime] = {}
            for cid in chunk:
                if cid not in found:
                    missing += 1
                elif found[cid][0] is not None:
                    opted += 1
                elif found[cid][1] == CheckStatus.PENDING:
                    kept += 1
                else:
                    due[cid] = slot
                    slot += step
            if due:
                queued += _make_pending(due, now)
    return Requested(queued, kept, opted, missing)


def _make_pending(due: dict[int, dt.datetime], now) -> list[tuple[int, dt.datetime]]:
    rows = [
        {
            "contact": cid,
            "status": CheckStatus.PENDING,
            "requested_at": now,
            "due_at": at,
            "enqueued_at": at,
            "attempts": 0,
            "lease_expires_at": None,
            "error": None,
        }
        for cid, at in due.items()
    ]
    # A finished check becomes pending again (its checked_at stays: when
    # the verdict on the contact was last written).
    NumberCheck.insert_many(rows).on_conflict(
        conflict_target=[NumberCheck.contact],
        preserve=[
            NumberCheck.status,
            NumberCheck.requested_at,
            NumberCheck.due_at,
            NumberCheck.enqueued_at,
            NumberCheck.attempts,
            NumberCheck.lease_expires_at,
            NumberCheck.error,
        ],
    ).execute()
    made = NumberCheck.select(NumberCheck.id, NumberCheck.contact).where(
        NumberCheck.contact.in_(list(due))
    )
    return sorted(
        ((check_id, due[cid]) for check_id, cid in made.tuples()),
        key=lambda pair: pair[1],
    )


def _next_slot(now: dt.datetime, step: dt.timedelta) -> dt.datetime:
    latest = _as_datetime(
        NumberCheck.select(pw.fn.MAX(NumberCheck.due_at))
        .where(NumberCheck.status == CheckStatus.PENDING, NumberCheck.attempts == 0)
        .scalar()
    )
    return now if latest is None else max(now, latest + step)


def campaign_contact_ids(campaign_id: int) -> list[int]:
    """A campaign's members, by contact id (`request` leaves out those who
    opted out, and counts them)."""
    return [
        cid
        for (cid,) in CampaignContact.select(CampaignContact.contact)
        .where(CampaignContact.campaign == campaign_id)
        .order_by(CampaignContact.contact)
        .tuples()
    ]


def missing_contacts(contact_ids: list[int]) -> list[int]:
    """The ids among `contact_ids` that name no contact, in order."""
    ids = list(dict.fromkeys(contact_ids))
    found: set[int] = set()
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        found.update(
            cid
            for (cid,) in Contact.select(Contact.id)
            .where(Contact.id.in_(chunk))
            .tuples()
        )
    return [cid for cid in ids if cid not in found]


def unknown_contact_ids() -> list[int]:
    """Contacts never found valid or invalid (and not opted out)."""
    return [
        cid
        for (cid,) in Contact.select(Contact.id)
        .where(Contact.wa_status == WaStatus.UNKNOWN, Contact.opted_out_at.is_null())
        .order_by(Contact.id)
        .tuples()
    ]


# --- running a check ---------------------------------------------------------------


def claim(check_id: int, now: dt.datetime, lease_s: float) -> Claimed | None:
    """Take a due pending check for `lease_s` (one worker at a time), or None."""
    not_opted_out = pw.fn.EXISTS(
        Contact.select(Contact.id).where(
            Contact.id == NumberCheck.contact, Contact.opted_out_at.is_null()
        )
    )
    with database.atomic():
        taken = (
            NumberCheck.update(
                attempts=NumberCheck.attempts + 1,
                lease_expires_at=now + dt.timedelta(seconds=lease_s),
            )
            .where(
                NumberCheck.id == check_id,
                NumberCheck.status == CheckStatus.PENDING,
                NumberCheck.due_at <= now,
                NumberCheck.lease_expires_at.is_null()
                | (NumberCheck.lease_expires_at < now),
                not_opted_out,
            )
            .execute()
        )
        if not taken:
            return None
        row = (
            NumberCheck.select(
                NumberCheck.id, NumberCheck.contact, NumberCheck.attempts, Contact.phone
            )
            .join(Contact)
            .where(NumberCheck.id == check_id)
            .tuples()
            .first()
        )
    check_id, contact_id, attempts, phone = row
    return Claimed(check_id, contact_id, phone, attempts)


def not_claimed(check_id: int, now: dt.datetime) -> tuple[str, dt.datetime | None]:
    """Why `claim` gave nothing, and the time to come back (not due yet).

    A pending check of a contact who opted out is finished here, unknown."""
    row = (
        NumberCheck.select(
            NumberCheck.status,
            NumberCheck.due_at,
            NumberCheck.lease_expires_at,
            Contact.opted_out_at,
        )
        .join(Contact)
        .where(NumberCheck.id == check_id)
        .tuples()
        .first()
    )
    if row is None:
        return "no such check", None
    status, due_at, lease, opted_out_at = row
    if status != CheckStatus.PENDING:
        return f"already {status}", None
    if opted_out_at is not None:
        finish(check_id, None, CheckStatus.UNKNOWN, now, "not checked: opted out")
        return "not checked: the contact opted out", None
    if lease is not None and lease >= now:
        return "another worker has it", None
    return "not due yet", due_at


def finish(
    check_id: int,
    contact_id: int | None,
    status: str,
    now: dt.datetime,
    error: str | None = None,
) -> bool:
    """A pending check's outcome; valid/invalid is also the contact's verdict."""
    with database.atomic():
        done = (
            NumberCheck.update(
                status=status, checked_at=now, error=error, lease_expires_at=None
            )
            .where(
                NumberCheck.id == check_id, NumberCheck.status == CheckStatus.PENDING
            )
            .execute()
        )
        if done and contact_id is not None and status != CheckStatus.UNKNOWN:
            Contact.update(wa_status=status, wa_checked_at=now).where(
                Contact.id == contact_id
            ).execute()
    return bool(done)


def retry_or_give_up(
    check: Claimed,
    reason: str,
    delay_s: float,
    max_attempts: int,
    now: dt.datetime,
) -> dt.datetime | None:
    """A provider error: due again after `delay_s`, or (attempts used up)
    finished unknown with the error. The new due time, or None."""
    if check.attempts >= max_attempts:
        error = f"{reason} (gave up after {check.attempts} attempts)"
        finish(check.id, check.contact_id, CheckStatus.UNKNOWN, now, error)
        return None
    due = now + dt.timedelta(seconds=delay_s)
    NumberCheck.update(
        due_at=due, enqueued_at=due, lease_expires_at=None, error=reason
    ).where(
        NumberCheck.id == check.id, NumberCheck.status == CheckStatus.PENDING
    ).execute()
    return due


def record_now(contact_id: int, exists: bool, now: dt.datetime) -> None:
    """A check made on the spot (`campaignd verify --phone`): the contact's
    row says so, finished, and the verdict is written."""
    status = CheckStatus.VALID if exists else CheckStatus.INVALID
    with database.atomic():
        NumberCheck.insert(
            contact=contact_id,
            status=status,
            requested_at=now,
            due_at=now,
            attempts=1,
            checked_at=now,
        ).on_conflict(
            conflict_target=[NumberCheck.contact],
            preserve=[
                NumberCheck.status,
                NumberCheck.requested_at,
                NumberCheck.due_at,
                NumberCheck.checked_at,
            ],
            update={
                NumberCheck.attempts: NumberCheck.attempts + 1,
                NumberCheck.error: None,
                NumberCheck.lease_expires_at: None,
            },
        ).execute()
        Contact.update(wa_status=status, wa_checked_at=now).where(
            Contact.id == contact_id
        ).execute()


# --- the sweeper --------------------------------------------------------------------


def take_lost(
    now: dt.datetime, grace_s: float, per_minute: float, limit: int = 5000
) -> list[tuple[int, dt.datetime]]:
    """Pending checks that are due, held by nobody, and whose queue entry is
    older than `grace_s`: (id, eta), the etas spread at the pace from now.

    Marks them enqueued until the last eta, so the next sweeps leave them
    alone while they run; a check both swept and still queued is harmless
    (the claim lets one through)."""
    stale = now - dt.timedelta(seconds=grace_s)
    with database.atomic():
        query = (
            NumberCheck.select(NumberCheck.id)
            .where(
                NumberCheck.status == CheckStatus.PENDING,
                NumberCheck.due_at <= now,
                NumberCheck.lease_expires_at.is_null()
                | (NumberCheck.lease_expires_at < now),
                NumberCheck.enqueued_at.is_null() | (NumberCheck.enqueued_at < stale),
            )
            .order_by(NumberCheck.due_at, NumberCheck.id)
            .limit(limit)
        )
        if is_postgres():
            query = query.for_update(skip_locked=True)
        ids = [check_id for (check_id,) in query.tuples()]
        step = spacing(per_minute)
        lost = [(check_id, now + i * step) for i, check_id in enumerate(ids)]
        if lost:
            until = lost[-1][1]
            for start in range(0, len(ids), _CHUNK):
                NumberCheck.update(enqueued_at=until).where(
                    NumberCheck.id.in_(ids[start : start + _CHUNK])
                ).execute()
    return lost


def respace_overdue(now: dt.datetime, per_minute: float) -> int:
    """Pending checks held by nobody whose time passed unrun (the daemon was
    down): due again one every 60/per_minute s from now, in their order, so
    that their queue entries, all due at once when it starts again, do not
    run them in a burst (before 2026-12-07;
    tests/integration/test_audit_verification.py). A claim refuses a check
    not due yet, and its entry comes back at the new time. How many."""
    step = spacing(per_minute)
    with database.atomic():
        ids = [
            check_id
            for (check_id,) in NumberCheck.select(NumberCheck.id)
            .where(
                NumberCheck.status == CheckStatus.PENDING,
                NumberCheck.due_at < now,
                NumberCheck.lease_expires_at.is_null()
                | (NumberCheck.lease_expires_at < now),
            )
            .order_by(NumberCheck.due_at, NumberCheck.id)
            .tuples()
        ]
        # The first keeps its turn now; each later one a step after. One
        # statement run for every row (executemany): a statement per row
        # held READY back by seconds behind a bulk verify's backlog.
        to_db = NumberCheck.due_at.db_value
        rows = []
        for i, check_id in enumerate(ids[1:], start=1):
            due = to_db(now + i * step)
            rows.append((due, due, check_id))
        if rows:
            database.cursor().executemany(_RESPACE_SQL.format(p=database.param), rows)
    return len(ids)


_RESPACE_SQL = (
    f"UPDATE {NumberCheck._meta.table_name}"
    f" SET {NumberCheck.due_at.column_name} = {{p}},"
    f" {NumberCheck.enqueued_at.column_name} = {{p}}"
    f" WHERE {NumberCheck.id.column_name} = {{p}}"
)


# --- figures ------------------------------------------------------------------------


def campaign_counts(
    campaign_id: int, members: int, per_minute: float, now: dt.datetime
) -> dict:
    """The checks of a campaign's members: counts by status, `unchecked`
    (members never requested), and `eta` (ISO, null unless pending)."""
    member = CampaignContact.select(CampaignContact.id).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.contact == NumberCheck.contact,
    )
    # Reads the check rows, each probing the (campaign, contact) index: no
    # cost for a million members while few numbers were ever checked.
    return _figures([pw.fn.EXISTS(member)], members, per_minute, now)


def contacts_counts(
    contact_ids: Iterable[int], per_minute: float, now: dt.datetime
) -> dict:
    ids = list(dict.fromkeys(contact_ids))
    parts = [
        _tally([NumberCheck.contact.in_(ids[start : start + _CHUNK])])
        for start in range(0, len(ids), _CHUNK)
    ]
    counts = dict.fromkeys(CheckStatus.ALL, 0)
    latest = None
    for part, part_latest in parts:
        for key, value in part.items():
            counts[key] += value
        if part_latest is not None and (latest is None or part_latest > latest):
            latest = part_latest
    return _with_eta(counts, len(ids), latest, per_minute, now)


def overall_counts(per_minute: float, now: dt.datetime) -> dict:
    return _figures([], Contact.select().count(), per_minute, now)


def eta(pending: int, latest_due, per_minute: float, now: dt.datetime):
    """When the last of `pending` checks should run: the latest due time,
    or, when they are late (workers down, a backlog), the pace from now."""
    if not pending:
        return None
    at_pace = now + (pending - 1) * spacing(per_minute)
    return at_pace if latest_due is None else max(latest_due, at_pace)


def _figures(where: list, total: int, per_minute: float, now) -> dict:
    counts, latest = _tally(where)
    return _with_eta(counts, total, latest, per_minute, now)


def _with_eta(counts: dict, total: int, latest, per_minute, now) -> dict:
    pending = counts[CheckStatus.PENDING]
    return {
        **counts,
        "unchecked": max(0, total - sum(counts.values())),
        "eta": iso_z(eta(pending, latest, per_minute, now), "seconds"),
    }


def _tally(where: list) -> tuple[dict, dt.datetime | None]:
    query = NumberCheck.select(
        NumberCheck.status,
        pw.fn.COUNT(NumberCheck.id),
        pw.fn.MAX(NumberCheck.due_at),
    )
    if where:
        query = query.where(*where)
    counts = dict.fromkeys(CheckStatus.ALL, 0)
    latest = None
    for status, count, max_due in query.group_by(NumberCheck.status).tuples():
        if status in counts:
            counts[status] = count
        if status == CheckStatus.PENDING:
            latest = _as_datetime(max_due)
    return counts, latest


def check_dict(contact_id: int) -> dict | None:
    """A contact's check as the API shows it, or None (never requested)."""
    row = NumberCheck.get_or_none(NumberCheck.contact == contact_id)
    if row is None:
        return None
    return {
        "status": row.status,
        "requested_at": iso_z(row.requested_at),
        "due_at": iso_z(row.due_at),
        "checked_at": iso_z(row.checked_at),
        "attempts": row.attempts,
        "error": row.error,
    }


def _as_datetime(value) -> dt.datetime | None:
    """MAX() over a timestamp: a datetime, or text on SQLite."""
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))
