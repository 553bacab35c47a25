"""A start after the whole tree died (its supervisor SIGKILLed with it).

The previous run's workers left rows leased to them and record files: the
rows they had on the wire become unconfirmed, the others never left; and
the tasks their threads had popped died with them. The new supervisor
releases the leases before any child starts (`recovery.release_at_start`)
and enqueues the rest as soon as its queues exist (`LeaseReleaser.prepare`),
behind a backlog too, instead of leaving them to the sweeper's 30 s grace.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import psutil
import pytest
from prometheus_client import REGISTRY

from daemon.app import recovery
from daemon.domain import campaigns
from daemon.runtime import InFlight
from daemon.runtime import inflight_dir
from daemon.runtime import inflight_records_kept
from daemon.runtime import recorded_pids
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import build_pipeline
from tests.send_helpers import drop_queue
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import run_queue
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

DEAD_PID = 999_999


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline(request, make_config, fake):
    cfg = mode_config(
        request, make_config, request.param, {"provider": {"base_url": fake.url}}
    )
    built = build_pipeline(cfg)
    yield built
    built.close()


def unconfirmed_recorded() -> float:
    """campaignd_unconfirmed_sends_total{outcome="recorded"} in this process."""
    value = REGISTRY.get_sample_value(
        "campaignd_unconfirmed_sends_total", {"outcome": "recorded"}
    )
    return value or 0.0


def m1_on_phones(fake, contact_ids) -> list[int]:
    counts = fake.phone_counts()
    phones = [Contact.get_by_id(c).phone for c in contact_ids]
    return [counts.get(p, {}).get("m1", 0) for p in phones]


def test_a_start_enqueues_what_the_dead_tree_left_behind_a_backlog(pipeline, fake):
    if psutil.pid_exists(DEAD_PID):
        pytest.skip(f"pid {DEAD_PID} is alive on this machine")
    contact_ids = seed_contacts(4)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    never_left, on_wire, popped, backlog = campaigns.fan_out(campaign.id)
    # The fan-out's entries: popped by the dead workers, or lost.
    drop_queue(pipeline.queues.messages)
    pipeline.tasks.send_single_message(backlog)  # still in the queue
    owner = f"{socket.gethostname()}:{DEAD_PID}:abcd"
    for message_id in (never_left, on_wire):
        assert campaigns.claim(message_id, owner, 600, utcnow()) is not None
    directory = inflight_dir(pipeline.cfg.data_path)
    dead = InFlight(directory, pid=DEAD_PID)
    dead.begin(on_wire)  # its request may have left
    dead.take("m", popped)  # popped by a thread that never claimed it

    unconfirmed_before = unconfirmed_recorded()

    left = recovery.release_at_start(pipeline.cfg)
    recovery.LeaseReleaser(pipeline.cfg, directory, left).prepare()

    assert unconfirmed_recorded() - unconfirmed_before == 1

    assert DEAD_PID not in recorded_pids(directory)
    run_queue(pipeline.queues.messages)
    # What the phones show: the row that never left and the popped one are
    # sent now, the backlog once; the one on the wire waits for evidence.
    assert m1_on_phones(fake, contact_ids) == [1, 0, 1, 1]
    assert Message.get_by_id(on_wire).status == "unconfirmed"


@pytest.mark.parametrize("records", ["removed", "of another boot"])
def test_a_start_without_the_previous_runs_records_resends_nothing(
    pipeline, fake, caplog, records
):
    """systemd removes the RuntimeDirectory on a stop, and a reboot empties a
    tmpfs (or leaves records on disk that were never fsynced): the dead
    workers' records no longer say which of their rows never left, so none
    is queued again; each waits as unconfirmed for a status or a reply."""
    if psutil.pid_exists(DEAD_PID):
        pytest.skip(f"pid {DEAD_PID} is alive on this machine")
    contact_ids = seed_contacts(2)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    on_wire, unrecorded = campaigns.fan_out(campaign.id)
    drop_queue(pipeline.queues.messages)
    owner = f"{socket.gethostname()}:{DEAD_PID}:abcd"
    for message_id in (on_wire, unrecorded):
        assert campaigns.claim(message_id, owner, 600, utcnow()) is not None
    directory = inflight_dir(pipeline.cfg.data_path)
    InFlight(directory, pid=DEAD_PID).begin(on_wire)
    if records == "removed":
        shutil.rmtree(directory)
    else:
        (Path(directory) / "boot_id").write_text("a previous boot")

    with caplog.at_level(logging.WARNING, logger="daemon.supervision.supervisor"):
        left = recovery.release_at_start(pipeline.cfg)
    recovery.LeaseReleaser(pipeline.cfg, directory, left).prepare()
    run_queue(pipeline.queues.messages)

    assert m1_on_phones(fake, contact_ids) == [0, 0]
    statuses = [Message.get_by_id(m).status for m in (on_wire, unrecorded)]
    assert statuses == ["unconfirmed", "unconfirmed"]
    assert "in-flight records of the previous run are gone" in caplog.text
    assert "2 rows its dead workers held" in caplog.text
    # This run's records are trusted again: a worker of this run that dies
    # with a row it never sent has that row queued again at once.
    assert inflight_records_kept(directory)
    assert DEAD_PID not in recorded_pids(directory)
