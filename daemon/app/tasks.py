"""The Huey tasks. Each carries only ids; the rows they name are the truth.

A `Tasks` object registers the tasks on the queues of one process. Producers
(web, CLI, scheduler) use it to enqueue; workers run the same functions.
Task names are the original system's: send_single_message,
send_campaign_messages, retry_failed_message, verify_whatsapp, bulk_verify,
process_webhook_event, plus send_messages (Message 1 in batches,
daemon/app/batch_tasks.py) and run_job for the periodic jobs.
verify_whatsapp takes a number check's id (daemon/app/verify_tasks.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import TypeVar

import peewee as pw

from daemon import metrics
from daemon.app.batch_tasks import HANDED_BACK
from daemon.app.batch_tasks import LEFT_FOR_ANOTHER
from daemon.app.batch_tasks import BatchSendTasks
from daemon.app.event_tasks import EventTasks
from daemon.app.event_tasks import pause_quietly
from daemon.app.recovery_tasks import TAKEN_KINDS
from daemon.app.recovery_tasks import RecoveryTasks
from daemon.app.verify_tasks import VerifyTasks
from daemon.config import Config
from daemon.domain import campaigns
from daemon.domain import unconfirmed
from daemon.domain.pacing import Pacer
from daemon.owners import lease_owner
from daemon.providers.base import PauseCampaignError
from daemon.providers.base import PermanentError
from daemon.providers.base import ProviderError
from daemon.providers.base import RecipientOptedOutError
from daemon.providers.base import RetryableError
from daemon.providers.base import UnconfirmedError
from daemon.runtime import InFlight
from daemon.runtime import TaskClock
from daemon.runtime import inflight_dir
from daemon.store.db import drop_connection
from daemon.store.db import is_postgres
from daemon.store.models import Campaign
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from daemon.store.queue import PRIORITY_HIGH
from daemon.store.queue import Queues
from daemon.store.queue import task_target
from daemon.store.statuses import MessageStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

# Fan-out chains a big campaign is split into (campaigns.fanout_ranges): each
# one a link at a time, so this many worker threads build Message 1 rows at
# once (the default deployment runs 2 processes x 2 threads on `messages`).
FANOUT_CHAINS = 2


class Tasks(BatchSendTasks, EventTasks, VerifyTasks, RecoveryTasks):
    def __init__(
        self,
        cfg: Config,
        queues: Queues,
        provider=None,
        *,
        clock: Callable = utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cfg = cfg
        self.queues = queues
        self.clock = clock
        self.sleep = sleep
        self.task_clock = TaskClock()
        self._provider = provider
        self._provider_lock = threading.Lock()
        self.pacer = Pacer(cfg.pacing, cfg.provider.device)
        self.backoff = campaigns.Backoff(
            cfg.retry.base_s, cfg.retry.factor, cfg.retry.cap_s, cfg.retry.jitter
        )
        # The lease outlives every path that can still be sending: the hard
        # time limit, seen up to a heartbeat late, then a draining worker's
        # stop timeout, plus a margin. An expired lease never belongs to a
        # live send.
        self.lease_s = (
            cfg.workers.hard_time_limit_s
            + cfg.supervisor.heartbeat_interval_s
            + cfg.daemon.stop_timeout_s
            + 30.0
        )
        self._inflight: InFlight | None = None
        # Each campaign's Message 1 text (it never changes), for Meta's
        # template parameters.
        self._message1_texts: dict[int, str] = {}
        # Set when this worker stops (hard limit, recycling, shutdown): deliver
        # claims nothing more (daemon/roles/worker.py sets it).
        self.draining = threading.Event()
        # The original system's task names, each on its original queue.
        self.send_single_message = self._register(
            "messages", "send_single_message", self.deliver
        )
        self.send_messages = self._register(
            "messages", "send_messages", self.deliver_all
        )
        self.send_campaign_messages = self._register(
            "messages", "send_campaign_messages", self.fan_out
        )
        self.retry_failed_message = self._register(
            "retry", "retry_failed_message", self.deliver
        )
        self.verify_whatsapp = self._register(
            "verification", "verify_whatsapp", self.verify
        )
        self.bulk_verify = self._register(
            "verification", "bulk_verify", self.verify_many
        )
        self.process_webhook_event = self._register(
            "default", "process_webhook_event", self.process_event
        )
        self.process_webhook_events = self._register(
            "default", "process_webhook_events", self.process_events
        )
        self.run_job = self._register("default", "run_job", self.job)

    def _register(self, queue: str, name: str, func: Callable):
        """A Huey task `name` on `queue` running `func`, timed and tracked."""
        # The task's histogram is made at its first run, not here: made for
        # every task at start-up in a freshly forked worker it cost 4-5 ms
        # before the first beat (bench/respawn_steps.py, a respawn's time).
        duration = None
        kind = TAKEN_KINDS.get(name)

        @functools.wraps(func)
        def tracked(*args, **kwargs):
            nonlocal duration
            self.task_clock.started()
            started = time.monotonic()
            if kind and args:
                self.inflight.take(kind, args[0])
            try:
                return func(*args, **kwargs)
            except (pw.OperationalError, pw.InterfaceError):
                # A restarted PostgreSQL leaves this thread's connection dead:
                # drop it so the next task reconnects instead of failing on
                # "the connection is closed" forever. The row is unchanged
                # (or leased), so the sweeper brings this task's work back.
                drop_connection()
                raise
            finally:
                if kind:
                    self.inflight.untake()
                if duration is None:
                    duration = metrics.TASK_SECONDS.labels(task=name)
                duration.observe(time.monotonic() - started)
                self.task_clock.finished()

        return self.queues.get(queue).task(name=name)(tracked)

    @property
    def provider(self):
        if self._provider is None:
            with self._provider_lock:
                if self._provider is None:
                    from daemon.providers import make_provider

                    self._provider = make_provider(self.cfg.provider)
        return self._provider

    # ------------------------------------------------------------ enqueueing

    def enqueue_sends(self, ids: Iterable[int], priority: int = 0) -> None:
        for message_id in ids:
            self.send_single_message(message_id, priority=priority)

    def enqueue_fanout(
        self, campaign_id: int, after: int = 0, until: int | None = None
    ) -> None:
        """The fan-out task for the members past `after` (0: from the start).

        Just below Message 2 and above every Message 1 send, so the next link
        of a fan-out chain does not wait behind the sends it just enqueued.
        """
        if until is None:
            self.send_campaign_messages(campaign_id, after, priority=PRIORITY_HIGH - 1)
        else:
            self.send_campaign_messages(
                campaign_id, after, until, priority=PRIORITY_HIGH - 1
            )

    def enqueue_event_chunks(self, chunks: list[list[int]]) -> None:
        """process_webhook_events for each chunk of stored event ids, in one
        round trip (one SQLite transaction or one ZADD): the web role's
        Enqueuer hands every chunk of a round over at once."""
        from daemon.store.queue_bulk import enqueue_many

        enqueue_many(self.process_webhook_events, [(chunk,) for chunk in chunks])

    def _schedule_send(self, message_id: int, eta, *, retry: bool = False) -> None:
        task = self.retry_failed_message if retry else self.send_single_message
        # Huey reads a naive eta as local time and keeps whole seconds: give
        # it an aware UTC time, rounded up so the task is never early.
        rounded = eta.replace(microsecond=0) + dt.timedelta(
            seconds=1 if eta.microsecond else 0
        )
        task.schedule(args=(message_id,), eta=rounded.replace(tzinfo=dt.UTC))

    # ------------------------------------------------------------ sending

    def deliver(self, message_id: int) -> str:
        """Claim -> pacing -> provider -> record. Returns what happened."""
        if self.draining.is_set():
            return self._leave_queued(message_id)
        owner = lease_owner()
        now = self.clock()
        message = campaigns.claim(message_id, owner, self.lease_s, now)
        if message is None:
            return self._not_claimed(message_id, now)
        return self._deliver_claimed(message, owner, now)

    def enqueue_waiting(self, message_ids: list[int]) -> int:
        """A send task for each of these rows that is still queued (rows
        sent, cancelled or taken by another worker meanwhile are left out);
        how many were enqueued."""
        waiting = Message.select(Message.id, Message.priority).where(
            Message.id.in_(message_ids), Message.status == MessageStatus.QUEUED
        )
        count = 0
        for message_id, priority in waiting.tuples():
            self.send_single_message(message_id, priority=priority)
            count += 1
        return count

    def _enqueue_again(self, message_ids: list[int]) -> None:
        """Rows that wait again (handed back, or a task this worker will not
        run), enqueued; if the queue fails, the sweeper finds the rows."""
        try:
            self.enqueue_waiting(message_ids)
        except Exception:  # noqa: BLE001 - the queue (or database) may be down
            log.warning("could not enqueue %d messages again", len(message_ids))

    def _deliver_claimed(
        self, message, owner: str, now, accepted: list | None = None
    ) -> str:
        """deliver, past the claim: pacing -> provider -> record. In a batch
        (`accepted` given) an accepted send is added there instead of being
        recorded, and its in-flight record stays open: the batch records
        them together, then ends them (deliver_all)."""
        write = functools.partial
        if message.attempts > campaigns.MAX_INTERRUPTED_ATTEMPTS:
            reason = "too many interrupted attempts"
            self._until_recorded(
                write(campaigns.record_failure, message, owner, reason)
            )
            return "failed"
        if message.kind == 2 and campaigns.session_closed(message, now):
            self._until_recorded(write(campaigns.expire_message2, message, owner, now))
            return "expired: WhatsApp's 24 h window closed"
        cap_day = None
        if message.kind == 1 and not self.pacer.unlimited:
            # The pacer's slots and daily counts are rows too. Its writes are
            # transactions: tried again, they at worst use up one more slot.
            # A slot long passed (its workers were down) is taken again:
            # else the whole backlog would go at once.
            slot = message.paced_until
            has_slot = slot is not None and now <= slot + self.pacer.slot_grace
            decision = self._until_recorded(
                write(self.pacer.decide, now, has_slot=has_slot)
            )
            if not decision.go:
                release = write(
                    campaigns.release,
                    message,
                    owner,
                    decision.retry_at,
                    decision.reason,
                    paced_until=decision.retry_at if decision.slot_reserved else None,
                )
                self._until_recorded(release)
                self._schedule_send(message.id, decision.retry_at)
                return f"deferred: {decision.reason}"
            cap_day = now.date()  # of the cap unit taken, if there is a cap
            if decision.wait_s > 0:
                self.sleep(decision.wait_s)
                # The claim's check is wait_s old: a STOP, a pause or a
                # cancel that came in meanwhile is obeyed.
                if not self._until_recorded(
                    write(campaigns.still_sendable, message, owner)
                ):
                    self._until_recorded(write(self._hand_back, [message.id], owner))
                    if cap_day is not None:  # nothing sent
                        self.pacer.give_back_daily(cap_day)
                    return HANDED_BACK
        inflight = self.inflight
        try:
            # Noted by the provider's client once connected, right before
            # the request's first byte can leave (Provider.send): a death
            # during a connect or TLS handshake re-sends the row at once.
            outcome = self._send_claimed(
                message, owner, lambda: inflight.begin(message.id), accepted, cap_day
            )
        except BaseException:
            # Not recorded (database down?): the request may have left, and
            # the row is still ours. Keep the record, so that if this worker
            # dies the supervisor makes the row unconfirmed, not queued.
            inflight.keep()
            raise
        if accepted is None:
            inflight.end()
        return outcome

    def _leave_queued(self, message_id: int) -> str:
        """A draining worker takes no new send: the row stays as it is, and
        its queue entry, which dies with this process, is enqueued again for
        another worker."""
        self._enqueue_again([message_id])
        return LEFT_FOR_ANOTHER

    @property
    def inflight(self) -> InFlight:
        """This process's record of the requests on the wire (see runtime)."""
        if self._inflight is None:
            self._inflight = InFlight(inflight_dir(self.cfg.data_path))
        return self._inflight

    def taken_noter(self, queue: str) -> Callable[[bytes], None]:
        """What a consumer of `queue` calls with each task it takes off the
        queue (store.queue.tell_taken), before Huey, which drops a popped
        task, even decodes it: the thread notes the task as taken (the
        wrapper of `_register` does it again, then clears it), so that its
        death between the pop and the task's first line replays the task
        at once instead of after the sweeper's grace."""
        huey = self.queues.get(queue)

        def note(data: bytes) -> None:
            try:
                task = task_target(huey, data, TAKEN_KINDS)
                # A delayed task (a retry's backoff) only passes through on
                # its way to Huey's schedule, where it stays safe: not taken.
                if task and (task.eta is None or task.eta <= _huey_now()):
                    self.inflight.take(task.kind, task.ids)
            except Exception:  # noqa: BLE001 - never in the way of the task
                log.debug("could not note a task taken off %s", queue, exc_info=True)

        return note

    def _send_claimed(
        self, message, owner: str, on_write, accepted=None, cap_day=None
    ) -> str:
        """The request, then the provider's answer recorded (_until_recorded).
        A request the provider refused gives back the unit of `cap_day`'s
        daily cap it took: a refusal is not a message on a phone."""
        record = functools.partial
        try:
            try:
                result = self.provider.send(
                    message.phone,
                    message.body,
                    message.idempotency_key,
                    kind=message.kind,
                    variables=self._variables(message),
                    on_write=on_write,
                )
            except ProviderError as exc:
                if exc.refused and cap_day is not None:
                    self.pacer.give_back_daily(cap_day)
                raise
        except UnconfirmedError as exc:
            answer = record(self._after_unconfirmed, message, owner, exc.reason)
        except RetryableError as exc:
            answer = record(self._after_retryable, message, owner, exc)
        except RecipientOptedOutError as exc:
            answer = record(self._after_opted_out, message, owner, exc.reason)
        except PauseCampaignError as exc:
            answer = record(self._after_pause, message, owner, exc.reason)
        except PermanentError as exc:
            answer = record(self._after_permanent, message, owner, exc.reason)
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the row
            # It may have struck after the request was written: unconfirmed,
            # so a bug can neither lose the row nor send it twice.
            log.exception("unexpected error sending message %s", message.id)
            reason = f"internal error: {exc}"
            answer = record(self._after_unconfirmed, message, owner, reason)
        else:
            answer = record(self._after_accepted, message, owner, result, accepted)
        return self._until_recorded(answer)

    def _until_recorded(self, answer: Callable[[], T]) -> T:
        """`answer()`, which records what became of a held row (what the
        provider said, or a decision before the request: paced, expired,
        failed), done once the database answers. Until then it is known to
        this thread alone: given up, the row would stay leased to this live
        worker until the lease runs out (minutes), then wait as unconfirmed
        even when no request left for it. So a database that fails (PostgreSQL
        restarting, SQLite locked past its busy timeout) is tried again,
        with backoff, until it answers or this worker drains (a stop, a
        reload, the supervisor's hard limit on a task this old). Then the
        error is raised, and the supervisor's release settles the row once
        the worker has exited (unconfirmed if its request may have left:
        _deliver_claimed keeps the in-flight record). Each answer is safe to
        run again: its writes only touch a row still held by `owner`."""
        delay = 0.1
        while True:
            try:
                return answer()
            except (pw.OperationalError, pw.InterfaceError) as exc:
                drop_connection()
                if self.draining.wait(delay):
                    raise
                log.warning("a held row's outcome not recorded (%s): retrying", exc)
                delay = min(delay * 2, 5.0)

    def _after_accepted(self, message, owner, result, accepted) -> str:
        """Recorded `sent` now, or added to a batch's `accepted` sends, which
        the batch records together (deliver_all)."""
        if accepted is not None:
            accepted.append(
                campaigns.AcceptedSend(
                    message, result.provider_id, result.wa_id, utcnow()
                )
            )
            return "sent"
        campaigns.record_sent(message, owner, result.provider_id, result.wa_id)
        _count_send(message.kind, "sent")
        return "sent"

    def _after_opted_out(self, message, owner, reason: str) -> str:
        contact = Contact.get_by_id(message.contact_id)
        # One commit: a kill between two would leave the row failed and the
        # contact not opted out, for `campaign retry-failed` to send again.
        with database.atomic():
            campaigns.record_failure(message, owner, reason)
            campaigns.opt_out_contact(contact, f"provider: {reason}")
        return "failed: opted out"

    def _after_pause(self, message, owner, reason: str) -> str:
        campaigns.release(message, owner, None, reason)
        pause_quietly(message.campaign_id, f"provider: {reason}")
        return "campaign paused"

    def _after_permanent(self, message, owner, reason: str) -> str:
        if campaigns.replied_meanwhile(message, owner, utcnow()):
            _count_send(message.kind, "sent")  # as _after_accepted
            return "sent: the contact replied"
        campaigns.record_failure(message, owner, reason)
        _count_send(message.kind, "failed")
        log.warning("%s failed: %s", _which(message), reason)
        return "failed"

    def _not_claimed(self, message_id: int, now) -> str:
        """Someone else has it, it is done, or it came early: then come back."""
        if withdrawn := campaigns.cancel_unclaimable(message_id):
            return f"cancelled: {withdrawn}"
        row = (
            Message.select(Message.status, Message.next_attempt_at)
            .where(Message.id == message_id)
            .first()
        )
        if row and row.status == "queued" and row.next_attempt_at:
            if row.next_attempt_at > now:
                self._schedule_send(message_id, row.next_attempt_at)
                return "not due yet: rescheduled"
        return "not claimable"

    def _after_unconfirmed(self, message, owner, reason) -> str:
        """The request may have reached the provider: wait for evidence."""
        if withdrawn := campaigns.cancel_if_withdrawn(message, owner):
            return f"cancelled: {withdrawn}"
        unconfirmed.mark(message, owner, reason, self.clock())
        log.warning(
            "%s: outcome unknown (%s): waiting for a status webhook or a reply",
            _which(message),
            reason,
        )
        _count_send(message.kind, "unconfirmed")
        metrics.UNCONFIRMED.labels(outcome="recorded").inc()
        return f"unconfirmed: {reason}"

    def _after_retryable(self, message, owner, exc: RetryableError) -> str:
        reason, retry_after = exc.reason, exc.retry_after
        delay = (
            retry_after
            if retry_after is not None
            else self.backoff.delay(message.failures + 1)
        )
        retry = campaigns.record_retryable(
            message, owner, reason, delay, self.cfg.retry.max_attempts, self.clock()
        )
        if retry.withdrawn:
            return f"cancelled: {retry.withdrawn}"
        if retry.replied:
            _count_send(message.kind, "sent")  # as _after_accepted
            return "sent: the contact replied"
        if retry.failed:
            _count_send(message.kind, "failed")
            log.warning(
                "%s failed after %d attempts: %s",
                _which(message),
                self.cfg.retry.max_attempts,
                reason,
            )
            return "failed"
        if retry.next_at is None:
            return "not ours any more"
        next_at = retry.next_at
        _count_send(message.kind, "retry")
        log.warning(
            "%s not sent: %s; retry at %s",
            _which(message),
            reason,
            next_at.isoformat(timespec="seconds"),
        )
        metrics.RETRIES.labels(kind=str(message.kind), reason=exc.label).inc()
        self._schedule_send(message.id, next_at, retry=True)
        return f"retry at {next_at.isoformat()}"

    def _variables(self, message: Message) -> dict[str, str]:
        if self.cfg.provider.kind != "meta" or message.kind != 1:
            return {}
        text = self._message1_texts.get(message.campaign_id)
        if text is None:
            text = Campaign.get_by_id(message.campaign_id).message1
            self._message1_texts[message.campaign_id] = text
        contact = Contact.get_by_id(message.contact_id)
        return campaigns.template_parameter_values(contact, text)

    def fan_out(
        self, campaign_id: int, after: int = 0, until: int | None = None
    ) -> int:
        """One batch of a running campaign's Message 1 rows, past member `after`.

        Each task does one batch and enqueues the next one, so no task comes
        near the hard time limit however big the campaign. A link lost to a
        dead worker is found by the sweeper (running campaign, pending members
        without a Message 1), which starts the chain again from 0.
        """
        batch = self.cfg.campaigns.fanout_batch
        if after == 0 and until is None:
            # The first link (or a chain started again by the sweep): a big
            # campaign gets FANOUT_CHAINS chains over disjoint member ranges,
            # this link being the first of the first one.
            if is_postgres():
                # Right after a big import the planner believes these tables
                # are empty (see fan_out_batch).
                database.execute_sql("ANALYZE campaign_contact, message")
            ranges = campaigns.fanout_ranges(campaign_id, FANOUT_CHAINS, batch)
            for start, end in ranges[1:]:
                self.enqueue_fanout(campaign_id, start, end)
            until = ranges[0][1]
        ids, next_after = campaigns.fan_out_batch(
            campaign_id, batch, after, until_member_id=until
        )
        if next_after is not None:
            # First, so another worker thread builds the next batch while
            # this one enqueues the sends.
            self.enqueue_fanout(campaign_id, next_after, until)
        # One round trip for the whole batch (Huey would make one per send).
        self.enqueue_message1(ids)
        if next_after is None:
            campaigns.maybe_complete(campaign_id)
        return len(ids)

    # ------------------------------------------------------------ periodic jobs

    def job(self, name: str) -> str:
        """Run one periodic job by name (the scheduler only enqueues these)."""
        from daemon.app import jobs

        return jobs.run(name, self, self.clock())


def _huey_now() -> dt.datetime:
    """Now as our queues' Huey compares etas (utc=True: naive UTC)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _which(message) -> str:
    """A message as the log names it (no phone number: logs travel)."""
    return (
        f"message {message.id} (campaign {message.campaign_id}, Message {message.kind})"
    )


def _count_send(kind: int, outcome: str) -> None:
    metrics.SENDS.labels(kind=str(kind), outcome=outcome).inc()
