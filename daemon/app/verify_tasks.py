"""WhatsApp number checks run from their rows (daemon/domain/contacts/
verification.py): the task verify_whatsapp(check_id) claims a due pending
check, asks the provider, and records the outcome on the row (and, valid or
invalid, on the contact). bulk_verify(contact_ids) is kept for entries an
older version queued: it requests those contacts' checks.

`VerifyTasks` is a mixin of `daemon.app.tasks.Tasks` (needs cfg, clock,
queues, provider, backoff, verify_whatsapp).
"""

from __future__ import annotations

import datetime as dt
import logging

from daemon.domain.contacts import verification
from daemon.providers.base import ProviderError
from daemon.providers.base import RetryableError
from daemon.store.models import CheckStatus

# The tasks' log, one name whichever module of theirs writes.
log = logging.getLogger("daemon.app.tasks")

NOT_SUPPORTED = "the provider has no number check (a bad number fails on send)"


class VerifyTasks:
    @property
    def verify_per_minute(self) -> float:
        return self.cfg.campaigns.verify_per_minute

    @property
    def check_lease_s(self) -> float:
        """A claim outlives the provider call it covers, plus a margin."""
        return self.cfg.provider.check_timeout_s + 30.0

    def request_checks(self, contact_ids) -> verification.Requested:
        """Make these contacts' checks pending and enqueue each for its time."""
        requested = verification.request(
            contact_ids, self.verify_per_minute, self.clock()
        )
        self.enqueue_checks(requested.queued)
        return requested

    def enqueue_checks(self, checks: list[tuple[int, dt.datetime]]) -> None:
        """verify_whatsapp(id) for each (id, eta), in one round trip. If this
        fails the rows are pending all the same: the sweeper enqueues them."""
        from daemon.store.queue_bulk import enqueue_many

        if checks:
            enqueue_many(
                self.verify_whatsapp,
                [(check_id,) for check_id, _ in checks],
                etas=[eta for _, eta in checks],
            )

    def verify(self, check_id: int) -> str:
        """Claim the check, ask the provider, record what it said."""
        now = self.clock()
        check = verification.claim(check_id, now, self.check_lease_s)
        if check is None:
            why, come_back = verification.not_claimed(check_id, now)
            if come_back is not None and come_back > now:
                self.enqueue_checks([(check_id, come_back)])
                return f"{why}: rescheduled"
            return why
        if not getattr(self.provider, "supports_number_check", True):
            # Meta's Cloud API has no pre-check: the contact's verdict stays.
            verification.finish(
                check.id, check.contact_id, CheckStatus.UNKNOWN, now, NOT_SUPPORTED
            )
            return CheckStatus.UNKNOWN
        try:
            result = self.provider.check_number(check.phone)
        except RetryableError as exc:
            return self._check_failed(check, exc.reason, exc.retry_after)
        except ProviderError as exc:
            # Asking again cannot help (a number the provider refuses, a bad
            # token): unknown, with the reason.
            log.warning("number check %s: %s", check.id, exc.reason)
            verification.finish(
                check.id,
                check.contact_id,
                CheckStatus.UNKNOWN,
                self.clock(),
                exc.reason,
            )
            return f"{CheckStatus.UNKNOWN}: {exc.reason}"
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the check
            log.exception("number check %s: unexpected error", check.id)
            return self._check_failed(check, f"internal error: {exc}", None)
        status = CheckStatus.VALID if result.exists else CheckStatus.INVALID
        verification.finish(check.id, check.contact_id, status, self.clock())
        return status

    def _check_failed(self, check, reason: str, retry_after: float | None) -> str:
        delay = (
            retry_after
            if retry_after is not None
            else self.backoff.delay(check.attempts)
        )
        due = verification.retry_or_give_up(
            check, reason, delay, self.cfg.retry.max_attempts, self.clock()
        )
        if due is None:
            log.warning(
                "number check %s: unknown after %d attempts: %s",
                check.id,
                check.attempts,
                reason,
            )
            return f"{CheckStatus.UNKNOWN}: {reason}"
        log.warning(
            "number check %s: %s; retry at %s",
            check.id,
            reason,
            due.isoformat(timespec="seconds"),
        )
        self.enqueue_checks([(check.id, due)])
        return f"retry at {due.isoformat()}"

    def verify_many(self, contact_ids: list[int]) -> int:
        """bulk_verify: an older version's request, made rows now."""
        return len(self.request_checks(contact_ids).queued)

    def sweep_checks(self, now: dt.datetime, grace_s: float) -> int:
        """Pending checks whose queue entry was lost, enqueued again at the
        pace (once the verification queue is drained: entries waiting in a
        backlog are not lost)."""
        if self.queues.verification.pending_count():
            return 0
        lost = verification.take_lost(now, grace_s, self.verify_per_minute)
        self.enqueue_checks(lost)
        return len(lost)
