"""What a dead worker's queues lost, enqueued again; and the sweeper's pass.

`RecoveryTasks` is a mixin of `daemon.app.tasks.Tasks`: the supervisor's
lease release (daemon/app/recovery.py) and the sweep job run these methods.
"""

from __future__ import annotations

from daemon import metrics
from daemon.domain import campaigns
from daemon.domain import events
from daemon.domain import unconfirmed
from daemon.store.queue import waiting_ids

# Above this many entries waiting in a queue, a death does not read them to
# find what it lost (replay_after_death): the sweeper does, after its grace.
REPLAY_SCAN_LIMIT = 5000

# Tasks whose queue entry dies with the thread that took it: the thread
# notes it (runtime.InFlight.take) so that a death enqueues it again.
TAKEN_KINDS = {
    "send_single_message": "m",
    "retry_failed_message": "m",
    "send_messages": "m",  # a batch of Message 1 ids, as the fan-out enqueues
    "process_webhook_event": "e",
    "process_webhook_events": "e",  # a chunk of ids, as the web role enqueues
}


class RecoveryTasks:
    """Enqueue again what was lost (needs cfg, clock, queues, the tasks
    send_single_message and process_webhook_event, enqueue_waiting,
    enqueue_fanout and sweep_checks)."""

    def release_dead_worker(
        self, host: str, pid: int, in_flight: set[int] | None
    ) -> unconfirmed.Released:
        """A worker died: its rows on the wire (`in_flight`; all it held when
        its records are lost: None) become unconfirmed; the others never left
        and are enqueued at once."""
        released = unconfirmed.release_dead_process(host, pid, in_flight)
        for message_id, priority in released.requeued:
            self.send_single_message(message_id, priority=priority)
        if released.unconfirmed:
            metrics.UNCONFIRMED.labels(outcome="recorded").inc(released.unconfirmed)
        return released

    def resume_taken(self, taken: set[tuple[str, int]], skip: set[int]) -> int:
        """A dead worker's taken tasks (runtime.read_taken) whose rows still
        wait, enqueued again; `skip`: message ids its release dealt with.
        How many were enqueued."""
        message_ids = [i for kind, i in taken if kind == "m" and i not in skip]
        event_ids = [i for kind, i in taken if kind == "e"]
        count = self.enqueue_waiting(message_ids) if message_ids else 0
        if event_ids:
            for event_id in events.unprocessed(event_ids):
                self.process_webhook_event(event_id)
                count += 1
        return count

    def replay_after_death(self, now=None) -> tuple[int, int]:
        """A consumer died: re-enqueue at once what its queues lost with it.

        Huey drops a task once popped, and Redis may even hand one to the
        connection of a process being killed, which never reads it (so no
        taken record names it). The sweeper would find such rows after its
        grace (30-60 s): a reply would wait that long for its Message 2.
        Every row still due that no entry of its queues names is lost: it
        is enqueued again now. One also in flight elsewhere is harmless (the
        claim lets one send through, events are processed once). Queues
        too long to read (REPLAY_SCAN_LIMIT) stay with the sweeper.
        (messages, events) enqueued again.
        """
        queues = self.queues
        waiting_sends = waiting_ids(
            (queues.messages, queues.retry), TAKEN_KINDS, "m", REPLAY_SCAN_LIMIT
        )
        waiting_events = waiting_ids(
            (queues.default,), TAKEN_KINDS, "e", REPLAY_SCAN_LIMIT
        )
        if waiting_sends is None and waiting_events is None:
            return 0, 0
        found = campaigns.sweep(
            now or self.clock(),
            grace_s=0,
            include_queued=waiting_sends is not None,
            in_queue=waiting_sends or (),
        )
        for message_id, priority in found.messages:
            self.send_single_message(message_id, priority=priority)
        event_ids = []
        if waiting_events is not None:
            event_ids = [e for e in found.events if e not in waiting_events]
        for event_id in event_ids:
            self.process_webhook_event(event_id)
        return len(found.messages), len(event_ids)

    def sweep_once(self, now=None, grace_s: float = 30.0) -> dict:
        """Re-enqueue what the queue may have lost (see campaigns.sweep)."""
        # Rows waiting in a long backlog are not lost: re-enqueueing them on
        # every sweep would only fill the queue with duplicates. Once the
        # send queues are drained, a due row that is still queued is lost.
        drained = not (
            self.queues.messages.pending_count() or self.queues.retry.pending_count()
        )
        found = campaigns.sweep(
            now or self.clock(), grace_s=grace_s, include_queued=drained
        )
        for message_id, priority in found.messages:
            self.send_single_message(message_id, priority=priority)
        settled = unconfirmed.settle(
            self.cfg.provider.confirm_window_s,
            self.cfg.provider.unconfirmed,
            now or self.clock(),
        )
        for message_id, priority in settled.resent:
            self.send_single_message(message_id, priority=priority)
        if settled.resent:
            metrics.UNCONFIRMED.labels(outcome="resent").inc(len(settled.resent))
        if settled.failed:
            metrics.UNCONFIRMED.labels(outcome="failed").inc(settled.failed)
        for event_id in found.events:
            self.process_webhook_event(event_id)
        for campaign_id in found.campaigns:
            self.enqueue_fanout(campaign_id)
        checks = self.sweep_checks(now or self.clock(), grace_s)
        return {
            "messages": len(found.messages),
            "events": len(found.events),
            "campaigns": len(found.campaigns),
            "unconfirmed_resent": len(settled.resent),
            "unconfirmed_failed": settled.failed,
            "checks": checks,
        }
