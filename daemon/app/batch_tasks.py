"""Message 1 in batches: the fan-out's send_messages task.

`BatchSendTasks` is a mixin of `daemon.app.tasks.Tasks` (it uses its
draining flag, pacer, clock, lease, task clock, in-flight records, and the
single-row send path `_not_claimed` / `_deliver_claimed` / `_enqueue_again`).

Why batches: a lone send costs a queue entry, a claim and a record, each a
write transaction on SQLite (a round trip on PostgreSQL). A batch of
SEND_BATCH rows is one queue entry, one claim (campaigns.claim_many) and,
on SQLite, one record transaction for all its accepted sends
(campaigns.record_sent_many); on PostgreSQL a send is recorded at once.
Only when sends are not paced: the pacer decides send by send and may wait,
which a batch would do holding its other rows.
"""

from __future__ import annotations

import logging
import time

import peewee as pw

from daemon import metrics
from daemon.domain import campaigns
from daemon.owners import lease_owner
from daemon.runtime import INFLIGHT_CAPACITY
from daemon.store.db import is_postgres

log = logging.getLogger(__name__)

# Message 1 rows a send_messages task carries: all of them may be on the
# wire (in-flight records open) until the batch records them.
SEND_BATCH = 8
assert SEND_BATCH <= INFLIGHT_CAPACITY
# Past this, a batch hands the rest of its rows back: with a slow provider
# the first send alone uses it up, and the rest go out one task a row.
BATCH_BUDGET_S = 0.25
LEFT_FOR_ANOTHER = "draining: left for another worker"
HANDED_BACK = "not sendable any more: handed back"


class BatchSendTasks:
    def enqueue_message1(self, ids: list[int]) -> None:
        """A fan-out batch's Message 1 sends, in one round trip: SEND_BATCH
        rows a task (deliver_all), or a task a row when sends are paced."""
        from daemon.store.queue_bulk import enqueue_many

        if not self.pacer.unlimited:
            enqueue_many(self.send_single_message, [(i,) for i in ids])
            return
        batches = [ids[i : i + SEND_BATCH] for i in range(0, len(ids), SEND_BATCH)]
        enqueue_many(self.send_messages, [(batch,) for batch in batches])

    def deliver_all(self, message_ids: list[int]) -> list[str]:
        """A batch of Message 1 sends; what happened to each row, in order.

        The rows are claimed in one statement, then sent one after the
        other, each checked again right before its send
        (campaigns.still_sendable) and each with the whole time limit. On
        SQLite the sends the provider accepted are recorded together when
        the batch ends (one write transaction), their in-flight records open
        until then. What stops a batch early hands the rest back, queued
        again as one task a row: a draining worker, sends that became paced,
        a batch past BATCH_BUDGET_S (a slow provider: idle threads share the
        rest, and a Message 2 does not wait behind a whole batch), and an
        error (the database gone: see _settle_interrupted). A worker killed
        mid-batch leaves its rows leased: the supervisor's release makes the
        ones in its in-flight records unconfirmed and queues again the rest.
        """
        if self.draining.is_set() or not self.pacer.unlimited:
            self._enqueue_again(message_ids)
            return [LEFT_FOR_ANOTHER] * len(message_ids)
        owner = lease_owner()
        now = self.clock()
        claimed = campaigns.claim_many(message_ids, owner, self.lease_s, now)
        order = [i for i in message_ids if i in claimed]
        # Claimed rows no request was made for: what an error gives back.
        unsent = set(order)
        # Sends the provider accepted and not recorded yet. Only on SQLite,
        # where a batch then takes the single write lock once for all its
        # records; on PostgreSQL each is recorded at once, as a lone send:
        # deferring them there cut W1 cluster from 851 to 661-683 msgs/s
        # (docs/benchmarks.md, fourth run).
        accepted: list[campaigns.AcceptedSend] = []
        together = None if is_postgres() else accepted
        try:
            outcomes = {
                i: self._not_claimed(i, now) for i in message_ids if i not in claimed
            }
            self._send_in_turn(order, claimed, owner, now, outcomes, unsent, together)
            self._record_accepted(accepted, owner)
        except BaseException:
            self._settle_interrupted(accepted, sorted(unsent), owner)
            raise
        return [outcomes[i] for i in message_ids]

    def _send_in_turn(
        self, order, claimed, owner, now, outcomes, unsent, accepted
    ) -> None:
        started = time.monotonic()
        for index, message_id in enumerate(order):
            if index:
                if self._cut_short(started):
                    rest = order[index:]
                    self._hand_back(rest, owner, unsent)
                    outcomes.update(dict.fromkeys(rest, LEFT_FOR_ANOTHER))
                    return
                self.task_clock.started()
                if not campaigns.still_sendable(claimed[message_id], owner):
                    self._hand_back([message_id], owner, unsent)
                    outcomes[message_id] = HANDED_BACK
                    continue
                now = self.clock()
            unsent.discard(message_id)
            outcomes[message_id] = self._deliver_claimed(
                claimed[message_id], owner, now, accepted
            )

    def _record_accepted(self, accepted: list, owner: str) -> None:
        """The batch's accepted sends recorded in one go (emptying
        `accepted`), then every in-flight record of the batch ended. If the
        record fails, the in-flight records are kept: should this worker
        die, the supervisor makes those rows unconfirmed, not queued."""
        try:
            if accepted:
                campaigns.record_sent_many(accepted, owner)
        except BaseException:
            self.inflight.keep()
            raise
        self.inflight.end()
        for send in accepted:
            metrics.SENDS.labels(kind=str(send.message.kind), outcome="sent").inc()
        accepted.clear()

    def _cut_short(self, started: float) -> bool:
        return (
            self.draining.is_set()
            or not self.pacer.unlimited
            or time.monotonic() - started > BATCH_BUDGET_S
        )

    def _hand_back(
        self, message_ids: list[int], owner: str, unsent: set | None = None
    ) -> None:
        """Held rows not sent: cancelled if withdrawn, else queued and
        enqueued again (campaigns.hand_back)."""
        campaigns.hand_back(message_ids, owner)
        if unsent is not None:
            unsent.difference_update(message_ids)
        self._enqueue_again(message_ids)

    def _settle_interrupted(self, accepted: list, unsent: list[int], owner) -> None:
        """A batch interrupted by an error: its accepted sends are recorded
        and its rows that no request was made for go back to the queue, now,
        or they would stay leased to this live worker until the lease
        expires (minutes; then even the rows never sent would wait for
        evidence as unconfirmed). The error is often the database itself
        (PostgreSQL restarting): tried again, with backoff, until it answers
        or the worker drains (Tasks._until_recorded). A drain (the
        supervisor's hard limit on a task this old, a reload, a stop) ends
        the wait: the worker exits, and the supervisor's release, tried
        again until the database answers, makes the accepted rows
        unconfirmed (their in-flight records are kept) and queues the
        others."""
        if not accepted and not unsent:
            # Any in-flight record still open is of a row already settled.
            self.inflight.end()
            return

        def settle() -> None:
            self._record_accepted(accepted, owner)
            if unsent:
                campaigns.hand_back(unsent, owner)

        try:
            self._until_recorded(settle)
        except (pw.OperationalError, pw.InterfaceError):
            log.warning(
                "could not record %d sends nor give back %d unsent messages "
                "of a batch; they are released when this worker exits",
                len(accepted),
                len(unsent),
            )
            return
        if unsent:
            self._enqueue_again(unsent)
