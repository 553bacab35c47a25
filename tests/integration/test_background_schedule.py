"""worker:background: one scheduler thread serves the schedules of its three queues.

A retry's backoff and a deferred verification wait in their queue's schedule
until due; the consumer's scheduler thread then moves them onto the queue.
worker:background consumes default, retry and verification with one
scheduler thread for all three (daemon/roles/worker.py, SharedScheduler): an
entry scheduled on any of them must still run when due.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from daemon.app.tasks import Tasks
from daemon.roles.worker import BACKGROUND_QUEUES
from daemon.roles.worker import SharedScheduler
from daemon.roles.worker import build_consumers
from daemon.store.queue import make_queues
from tests.send_helpers import mode_config

# The consumer's main loop sees a stop at its next heartbeat.
QUICK_STOP = {"supervisor": {"heartbeat_interval_s": 0.5}}


def _run_until(consumer, done: threading.Event, timeout: float) -> None:
    """consumer.run() in this (the main) thread, as the worker role runs it,
    stopped once `done` is set or after `timeout`."""

    def stopper():
        done.wait(timeout)
        consumer.stop(graceful=True)

    threading.Thread(target=stopper, daemon=True).start()
    consumer.run()


@pytest.mark.parametrize("mode", ["sqlite", "cluster"])
def test_entries_scheduled_on_each_background_queue_run_when_due(
    mode, make_config, request
):
    cfg = mode_config(request, make_config, mode, QUICK_STOP)
    tasks = Tasks(cfg, make_queues(cfg))
    ran: queue.SimpleQueue = queue.SimpleQueue()
    probes = {}
    for name in BACKGROUND_QUEUES:
        huey = tasks.queues.get(name)

        def probe(queue_name=name):
            ran.put((queue_name, time.monotonic()))

        probes[name] = huey.task(name=f"probe_{name}")(probe)
    consumer = build_consumers(cfg, BACKGROUND_QUEUES, tasks)
    scheduled_at = time.monotonic()
    for probe in probes.values():
        probe.schedule(delay=1.5)

    seen: dict[str, float] = {}
    schedulers_alive = [0]
    done = threading.Event()

    def collect():
        deadline = time.monotonic() + 20
        while len(seen) < len(BACKGROUND_QUEUES) and time.monotonic() < deadline:
            alive = sum(t.name == "Scheduler" for t in threading.enumerate())
            schedulers_alive[0] = max(schedulers_alive[0], alive)
            try:
                name, at = ran.get(timeout=0.05)
            except queue.Empty:
                continue
            seen[name] = at - scheduled_at
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    _run_until(consumer, done, 25)

    assert sorted(seen) == sorted(BACKGROUND_QUEUES)
    # Not before their time: they waited in the schedule, not on the queue.
    assert all(after >= 1.4 for after in seen.values()), seen
    alive = [t for t in threading.enumerate() if t.name == "Scheduler"]
    assert not alive, "the scheduler thread outlived the consumer's stop"
    assert schedulers_alive == [1], "one scheduler thread for the three queues"


def test_a_dead_scheduler_is_replaced_for_every_queue(make_config, monkeypatch):
    """A scheduler thread that dies (a bug in it) is restarted by Huey's
    health check; the new one reads the companions' schedules too, and no
    companion starts a scheduler of its own."""
    cfg = make_config("sqlite", QUICK_STOP)
    tasks = Tasks(cfg, make_queues(cfg))
    ran: queue.SimpleQueue = queue.SimpleQueue()

    def probe():
        alive = [t for t in threading.enumerate() if t.name == "Scheduler"]
        ran.put(len(alive))

    task = tasks.queues.get("retry").task(name="probe_retry")(probe)
    consumer = build_consumers(cfg, BACKGROUND_QUEUES, tasks)
    died = threading.Event()
    sleep_for_interval = SharedScheduler.sleep_for_interval

    def dies_once(self, *args):
        if not died.is_set():
            died.set()
            raise RuntimeError("a bug in the scheduler")
        return sleep_for_interval(self, *args)

    monkeypatch.setattr(SharedScheduler, "sleep_for_interval", dies_once)
    # Due well after the first scheduler's first (and last) round, so only
    # its replacement can move it.
    task.schedule(delay=2.0)
    result: list[int] = []
    done = threading.Event()

    def collect():
        try:
            result.append(ran.get(timeout=20))
        except queue.Empty:
            pass
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    _run_until(consumer, done, 25)

    assert died.is_set()
    assert result == [1], "the retry never ran, or two schedulers were alive"
