"""Webhook events applied: a reply (maybe a Message 2, maybe an opt-out) or
a status update, each in one transaction with marking its event processed.

`EventTasks` is a mixin of `daemon.app.tasks.Tasks` (the tasks
process_webhook_event and process_webhook_events run these methods).
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import peewee as pw

from daemon import metrics
from daemon.domain import campaigns
from daemon.domain import events
from daemon.errors import StateError
from daemon.providers import webhook_parser
from daemon.providers.base import InboundMessage
from daemon.providers.base import StatusUpdate
from daemon.store.models import Contact
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.queue import PRIORITY_HIGH

# The tasks' log, one name whichever module of theirs writes.
log = logging.getLogger("daemon.app.tasks")


class EventTasks:
    """Apply stored webhook events (needs cfg, clock, enqueue_sends)."""

    def process_event(self, event_id: int) -> str:
        """Apply one stored webhook item; marks it processed in the same transaction.

        A failure is counted on the row in a transaction of its own (attempts,
        last_error); at web.event_max_attempts the event becomes a dead letter
        (daemon/domain/events.py): no longer replayed by the sweeper, no longer
        holding back expiry. The database being unreachable is not the
        event's fault: that is raised and counts nothing.
        """
        message2_ids: list[int] = []
        try:
            with database.atomic():
                event = InboundEvent.get_or_none(InboundEvent.id == event_id)
                if event is None or event.processed_at is not None:
                    return "already processed"
                if event.dead_at is not None:
                    return "dead letter: not processed until replayed"
                try:
                    item = json.loads(event.payload)
                    parsed = webhook_parser(event.provider).parse(item)
                except (ValueError, KeyError) as exc:
                    outcome = f"unparseable: {exc}"
                else:
                    outcome = self._apply_event(parsed, event, message2_ids)
                InboundEvent.update(
                    processed_at=self.clock(),
                    result=outcome[:200],
                    attempts=InboundEvent.attempts + 1,
                ).where(
                    InboundEvent.id == event_id, InboundEvent.processed_at.is_null()
                ).execute()
        except (pw.OperationalError, pw.InterfaceError):
            raise
        except Exception as exc:  # noqa: BLE001 - counted on the row, then dead
            error = events.storable_error(exc)
            limit = self.cfg.web.event_max_attempts
            counted = events.record_failure(event_id, error, limit, self.clock())
            if counted is None:
                log.warning("webhook event %s failed: %s", event_id, error)
                return f"failed: {error}"
            attempts, dead = counted
            if not dead:
                log.warning(
                    "webhook event %s failed (attempt %d of %d): %s",
                    event_id,
                    attempts,
                    limit,
                    error,
                    exc_info=exc,
                )
                return f"failed (attempt {attempts} of {limit}): {error}"
            log.error(
                "webhook event %s is a dead letter after %d failed attempts: %s",
                event_id,
                attempts,
                error,
                exc_info=exc,
            )
            try:
                events.sync_alert(self.cfg)
            except Exception:  # noqa: BLE001 - the health check raises it later
                log.warning("could not raise %s", events.ALERT_KEY, exc_info=True)
            return f"dead letter after {attempts} attempts: {error}"
        # After the commit: a worker killed here leaves a queued Message 2
        # row, which the sweeper enqueues.
        self.enqueue_sends(message2_ids, priority=PRIORITY_HIGH)
        return outcome

    def process_events(self, event_ids: list[int]) -> int:
        """Several stored webhook items in turn (the web role batches them).

        process_event counts and logs an event's own failure; what still
        raises here (the database unreachable) is logged and left to the
        sweeper, and the other events of the batch are still tried.
        """
        for event_id in event_ids:
            try:
                self.process_event(event_id)
            except Exception:  # noqa: BLE001 - one bad event must not block the rest
                log.exception("processing webhook event %s failed", event_id)
        return len(event_ids)

    def _apply_event(self, parsed, event, message2_ids: list[int]) -> str:
        if isinstance(parsed, InboundMessage):
            written = _written_at(parsed)
            reply = campaigns.handle_reply(
                parsed.from_phone,
                parsed.body,
                is_group=parsed.is_group,
                window_h=self.cfg.campaigns.reply_window_h,
                opt_out_keywords=self.cfg.campaigns.opt_out_keywords,
                event_id=event.id,
                now=self._reply_time(written, event),
                written_at=written,
            )
            metrics.INTERACTIONS.labels(outcome=reply.outcome).inc()
            if reply.message2_id:
                message2_ids.append(reply.message2_id)
            return f"reply: {reply.outcome}"
        if isinstance(parsed, StatusUpdate):
            return self._apply_status(parsed)
        return f"ignored: {getattr(parsed, 'reason', '')}"

    def _reply_time(self, written: dt.datetime | None, event) -> dt.datetime:
        """When the contact wrote, as far as the reply window is concerned.

        Not when a (possibly backlogged) worker gets to it, and not when the
        provider's retry finally reached us: the provider's own timestamp,
        bounded by our receipt time (a clock ahead of ours gains nothing).
        """
        received = min(event.received_at, self.clock())
        return received if written is None else min(written, received)

    def _apply_status(self, update) -> str:
        message = campaigns.find_message(
            update.reference, update.provider_message_id, update.wa_id
        )
        if message is None:
            return "status: unknown message"
        failed = update.status == "failed"
        if failed and update.campaign_action == "opt_out":
            # First: the member ends opted out (final for every campaign),
            # not merely failed in this one.
            contact = Contact.get_by_id(message.contact_id)
            campaigns.opt_out_contact(contact, f"provider code {update.error_code}")
        moved = campaigns.apply_status(
            message,
            update.status,
            error=update.failure_reason or update.error,
            now=self.clock(),
            provider_id=update.provider_message_id,
            wa_id=update.wa_id,
        )
        if moved:
            metrics.STATUS_UPDATES.labels(status=update.status).inc()
            if message.status == "unconfirmed" and not failed:
                metrics.UNCONFIRMED.labels(outcome="confirmed_status").inc()
        if failed and update.campaign_action == "pause":
            pause_quietly(message.campaign_id, f"provider code {update.error_code}")
        return f"status {update.status}: {'applied' if moved else 'no change'}"


def _written_at(parsed) -> dt.datetime | None:
    """The provider's time of an inbound message (naive UTC), if it gave one."""
    if not parsed.timestamp or parsed.timestamp <= 0:
        return None
    try:
        written = dt.datetime.fromtimestamp(parsed.timestamp, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return written.replace(tzinfo=None)


def pause_quietly(campaign_id: int, reason: str) -> None:
    """Pause for a provider flag; already paused (another send, the operator)
    or finished is fine: the flag changes nothing then."""
    try:
        campaigns.pause_campaign(campaign_id, reason)
    except StateError:
        log.info("campaign %s not paused (%s): not running", campaign_id, reason)
