"""Stored webhook events that cannot be processed: the dead letters.

A webhook is stored (inbound_event) before it is answered, then processed on
the 'default' queue. Processing that raises (anything but the database being
unreachable) is counted on the row by `record_failure`: `attempts` + 1 and
`last_error`, and at `web.event_max_attempts` the row gets `dead_at`. A dead
event is no longer replayed by the sweeper and no longer holds back the
expiry of the members who never replied (campaigns.sweep and
campaigns.expire_interactions leave it out), so one poison event cannot stop
every campaign. The operator lists dead letters (`campaignd events list
--dead`, GET /api/v1/events?dead=true) and replays one after a fix
(`campaignd events replay ID`, POST /api/v1/events/{id}/replay).

The alert ``events:dead_letters`` is raised when an event dies and by the
health check while any dead letter exists; it is resolved by the health
check, or by the replay of the last one.
"""

from __future__ import annotations

import logging

from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.models import iso_z
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

ALERT_KEY = "events:dead_letters"
ERROR_LIMIT = 1000  # characters of last_error kept
MAX_LIST = 1000


def storable_error(exc: BaseException) -> str:
    """One bounded, storable line (no NUL, no lone surrogate) for `exc`."""
    from daemon.providers.base import storable_text

    text = f"{type(exc).__name__}: {exc}"
    return storable_text(" ".join(text.split()))[:ERROR_LIMIT]


def record_failure(
    event_id: int, error: str, max_attempts: int, now=None
) -> tuple[int, bool] | None:
    """Count one failed processing of an event, in its own transaction.

    (attempts, dead) after counting; dead once attempts reach `max_attempts`.
    None when the row is gone, processed or already dead (nothing counted).
    """
    now = now or utcnow()
    open_row = (
        InboundEvent.id == event_id,
        InboundEvent.processed_at.is_null(),
        InboundEvent.dead_at.is_null(),
    )
    with database.atomic():
        updated = (
            InboundEvent.update(
                attempts=InboundEvent.attempts + 1, last_error=error[:ERROR_LIMIT]
            )
            .where(*open_row)
            .execute()
        )
        if not updated:
            return None
        attempts = (
            InboundEvent.select(InboundEvent.attempts)
            .where(InboundEvent.id == event_id)
            .scalar()
        )
        dead = attempts >= max_attempts
        if dead:
            InboundEvent.update(dead_at=now).where(*open_row).execute()
    return attempts, dead


def unprocessed(event_ids: list[int]) -> list[int]:
    """Those of `event_ids` still waiting for processing (not dead letters)."""
    return [
        e.id
        for e in InboundEvent.select(InboundEvent.id).where(
            InboundEvent.id.in_(event_ids),
            InboundEvent.processed_at.is_null(),
            InboundEvent.dead_at.is_null(),
        )
    ]


def dead_count() -> int:
    return InboundEvent.select().where(InboundEvent.dead_at.is_null(False)).count()


def event_state(event: InboundEvent) -> str:
    if event.processed_at is not None:
        return "processed"
    if event.dead_at is not None:
        return "dead"
    return "pending"


def event_dict(event: InboundEvent) -> dict:
    return {
        "id": event.id,
        "provider": event.provider,
        "event_type": event.event_type,
        "state": event_state(event),
        "received_at": iso_z(event.received_at),
        "processed_at": iso_z(event.processed_at),
        "dead_at": iso_z(event.dead_at),
        "attempts": event.attempts,
        "last_error": event.last_error,
        "result": event.result,
    }


def list_events(dead: bool | None = None, limit: int = 100) -> list[dict]:
    """Newest first; dead=True only dead letters, False none of them, None all."""
    if not 1 <= limit <= MAX_LIST:
        from daemon.errors import InputError

        raise InputError(f"limit: must be between 1 and {MAX_LIST}, got {limit}")
    query = InboundEvent.select(
        InboundEvent.id,
        InboundEvent.provider,
        InboundEvent.event_type,
        InboundEvent.received_at,
        InboundEvent.processed_at,
        InboundEvent.dead_at,
        InboundEvent.attempts,
        InboundEvent.last_error,
        InboundEvent.result,
    )
    if dead is True:
        query = query.where(InboundEvent.dead_at.is_null(False))
    elif dead is False:
        query = query.where(InboundEvent.dead_at.is_null())
    return [event_dict(e) for e in query.order_by(InboundEvent.id.desc()).limit(limit)]


def revive(event_id: int) -> InboundEvent:
    """Make a dead letter pending again: dead_at cleared, attempts back to 0.

    The caller enqueues its processing. NotFoundError for an unknown id,
    StateError for an event that is processed or not dead.
    """
    with database.atomic():
        revived = (
            InboundEvent.update(dead_at=None, attempts=0)
            .where(
                InboundEvent.id == event_id,
                InboundEvent.dead_at.is_null(False),
                InboundEvent.processed_at.is_null(),
            )
            .execute()
        )
        event = InboundEvent.get_or_none(InboundEvent.id == event_id)
    if event is None:
        raise NotFoundError(f"webhook event {event_id} does not exist")
    if not revived:
        if event.processed_at is not None:
            raise StateError(
                f"webhook event {event_id} is already processed "
                f"({iso_z(event.processed_at)}: {event.result or 'no result'})"
            )
        raise StateError(
            f"webhook event {event_id} is not a dead letter (pending, "
            f"{event.attempts} failed attempts): the sweeper replays it"
        )
    return event


def replay(event_id: int, tasks, cfg=None) -> InboundEvent:
    """Revive a dead letter, enqueue its processing, settle the alert."""
    event = revive(event_id)
    tasks.process_webhook_event(event.id)
    log.warning("webhook event %s replayed by the operator", event.id)
    sync_alert(cfg)
    return event


def sync_alert(cfg=None) -> int:
    """Raise ``events:dead_letters`` while dead letters exist, else resolve it."""
    from daemon.domain import alerts

    count = dead_count()
    if count:
        alerts.raise_alert(
            ALERT_KEY,
            f"{count} webhook event(s) could not be processed and are dead "
            "letters: see `campaignd events list --dead`, replay with "
            "`campaignd events replay ID`",
            severity="warning",
            cfg=cfg,
        )
    else:
        alerts.resolve_alert(ALERT_KEY, cfg=cfg, message="no dead-letter events left")
    return count
