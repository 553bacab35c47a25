"""An idle SQLite-queue worker is woken by an enqueue, not by its poll.

A real `campaignd worker --queue messages` (two threads) on SqliteHuey with a
fallback poll of 20 s: a campaign started by this process (another process
than the worker) gets its Message 1 to the provider within 10 s, which only
the wake-up can do. With the wake sockets removed (a lost poke), the task
still runs, by the poll. Either way, SIGTERM ends the worker at once and its
sockets are gone with it.
"""

from __future__ import annotations

import os
import time

import pytest

from daemon.domain import campaigns
from daemon.store.wakeup import wake_dir
from tests.send_helpers import build_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import running_workers
from tests.send_helpers import seed_contacts
from tests.send_helpers import sent_count
from tests.send_helpers import wait_with_logs

pytestmark = pytest.mark.slow

POLL_S = 20.0  # the fallback poll: an idle thread looks on its own this often
DEADLINE_S = POLL_S / 2  # so a task that meets it cannot have been found by polling
THREADS = 2


def _config(make_config, fake, poll_s: float):
    return make_config(
        "sqlite",
        {
            "provider": {"base_url": fake.url},
            "workers": {"messages_threads": THREADS},
            "queue": {"idle_poll_s": poll_s},
        },
    )


def _sockets(cfg) -> list[str]:
    directory = wake_dir(cfg.queue_url, f"{cfg.queue.name_prefix}_messages")
    try:
        return [os.path.join(directory, n) for n in os.listdir(directory)]
    except FileNotFoundError:
        return []


def _stops_at_once(workers, cfg) -> None:
    """SIGTERM is not held up by a thread waiting out its poll."""
    started = time.monotonic()
    assert workers[0].stop(timeout=POLL_S) == 0
    assert time.monotonic() - started < DEADLINE_S
    assert _sockets(cfg) == []


@pytest.mark.timeout(90)
def test_enqueue_from_another_process_wakes_the_idle_worker(
    request, make_config, tmp_path, fake
):
    cfg = _config(make_config, fake, POLL_S)
    pipeline = build_pipeline(cfg)
    request.addfinalizer(pipeline.close)
    campaign = new_campaign(seed_contacts(3))
    with running_workers(cfg, ["messages"], tmp_path / "logs") as workers:
        # Each thread found the queue empty and waits on its socket.
        wait_with_logs(
            lambda: len(_sockets(cfg)) == THREADS, workers, 30, "both threads waiting"
        )
        enqueued = time.monotonic()
        campaigns.start_campaign(campaign.id, pipeline.tasks)
        wait_with_logs(
            lambda: sent_count(campaign.id) == 3,
            workers,
            DEADLINE_S,
            f"Message 1 at the provider well before the {POLL_S:g}s poll",
        )
        assert time.monotonic() - enqueued < DEADLINE_S
        assert fake.stats()["sends_accepted"] == 3
        _stops_at_once(workers, cfg)


@pytest.mark.timeout(90)
def test_a_lost_poke_costs_one_poll_not_the_task(request, make_config, tmp_path, fake):
    poll_s = 1.0
    cfg = _config(make_config, fake, poll_s)
    pipeline = build_pipeline(cfg)
    request.addfinalizer(pipeline.close)
    campaign = new_campaign(seed_contacts(3))
    with running_workers(cfg, ["messages"], tmp_path / "logs") as workers:
        wait_with_logs(
            lambda: len(_sockets(cfg)) == THREADS, workers, 30, "both threads waiting"
        )
        for path in _sockets(cfg):
            os.unlink(path)  # nobody can poke them now
        campaigns.start_campaign(campaign.id, pipeline.tasks)
        wait_with_logs(
            lambda: sent_count(campaign.id) == 3, workers, 30, "Message 1, by polling"
        )
        assert fake.stats()["sends_accepted"] == 3
        # A thread whose socket vanished binds a new one at its next poll.
        wait_with_logs(
            lambda: len(_sockets(cfg)) == THREADS, workers, 30, "sockets bound again"
        )
        _stops_at_once(workers, cfg)
