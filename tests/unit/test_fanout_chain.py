"""Fan-out as a chain of tasks: one batch each, the next one enqueued by it.

A campaign of a million contacts must not be one task (it would reach the hard
time limit and get its worker killed), so each `send_campaign_messages` task
makes one batch of Message 1 rows and enqueues the next link; the sweeper
starts a lost chain again. Run in each storage mode: the bulk enqueue and the
member query differ between SQLite + SqliteHuey and PostgreSQL + Redis.
"""

from __future__ import annotations

from collections import Counter

import pytest

from daemon.domain import campaigns
from daemon.store.models import Message
from tests.send_helpers import build_pipeline
from tests.send_helpers import close_db
from tests.send_helpers import member_counts
from tests.send_helpers import message_counts
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

BATCH = 5
FANOUT = "send_campaign_messages"
SEND = "send_messages"  # a chunk of Message 1 ids


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline(request, make_config):
    cfg = mode_config(
        request, make_config, request.param, {"campaigns": {"fanout_batch": BATCH}}
    )
    built = build_pipeline(cfg)
    yield built
    built.close()
    close_db(built.db)


def drain(pipeline, *, drop_fanout_after: int | None = None) -> dict:
    """Pop the messages queue: run every fan-out link, only count the sends.

    `drop_fanout_after`: lose the fan-out links after that many ran (a worker
    killed between popping a link and running it).
    """
    huey = pipeline.queues.messages
    ran: list[int] = []  # Message 1 rows made by each link
    sends: Counter[int] = Counter()
    dropped = 0
    while (task := huey.dequeue()) is not None:
        if task.name == FANOUT:
            if drop_fanout_after is not None and len(ran) >= drop_fanout_after:
                dropped += 1
                continue
            ran.append(huey.execute(task))
        elif task.name == SEND:
            sends.update(task.args[0])
        else:  # a row enqueued alone (a resume, the sweep)
            assert task.name == "send_single_message", task.name
            sends[task.args[0]] += 1
    return {"links": ran, "sends": sends, "dropped": dropped}


def message1_ids(campaign_id: int) -> list[int]:
    query = Message.select(Message.id).where(
        Message.campaign == campaign_id, Message.kind == 1
    )
    return sorted(m.id for m in query)


def test_each_task_makes_one_batch_and_enqueues_the_next(pipeline):
    campaign = new_campaign(seed_contacts(23))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    assert pipeline.queues.messages.pending_count() == 1

    result = drain(pipeline)

    # 23 members in batches of 5: five links, the short last one ends it.
    assert result["links"] == [5, 5, 5, 5, 3]
    assert message_counts(campaign.id) == {"queued": 23}
    # Every Message 1 was enqueued once, by the link that made it.
    assert sorted(result["sends"]) == message1_ids(campaign.id)
    assert set(result["sends"].values()) == {1}
    assert campaigns.get_campaign(campaign.id).status == "running"


def test_a_chain_ending_on_a_full_batch_stops_at_an_empty_link(pipeline):
    campaign = new_campaign(seed_contacts(2 * BATCH))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    assert drain(pipeline)["links"] == [5, 5, 0]
    assert message_counts(campaign.id) == {"queued": 10}


def test_the_next_link_runs_before_the_sends_already_queued(pipeline):
    """Links jump the sends: the fan-out does not wait for the backlog."""
    campaign = new_campaign(seed_contacts(12))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    huey = pipeline.queues.messages
    order = []
    while (task := huey.dequeue()) is not None:
        order.append(task.name)
        if task.name == FANOUT:
            huey.execute(task)
    # Batches of 5, 5 and 2: one chunk of sends each.
    assert order == [FANOUT] * 3 + [SEND] * 3


def test_a_lost_link_is_started_again_by_the_sweep(pipeline):
    campaign = new_campaign(seed_contacts(23))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    first = drain(pipeline, drop_fanout_after=2)
    assert first["links"] == [5, 5]
    assert first["dropped"] == 1
    assert message_counts(campaign.id) == {"queued": 10}
    assert member_counts(campaign.id) == {"pending": 23}

    # The sweeper sees pending members without a Message 1 in a running
    # campaign and enqueues its fan-out (from the start) again.
    assert pipeline.tasks.sweep_once()["campaigns"] == 1
    second = drain(pipeline)

    # It walks past the members already done and makes only the missing rows.
    assert sum(second["links"]) == 13
    assert message_counts(campaign.id) == {"queued": 23}
    ids = message1_ids(campaign.id)
    assert sorted(first["sends"] + second["sends"]) == ids
    assert pipeline.tasks.sweep_once()["campaigns"] == 0


def test_a_paused_campaign_stops_the_chain(pipeline):
    campaign = new_campaign(seed_contacts(12))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    huey = pipeline.queues.messages
    assert huey.execute(huey.dequeue()) == 5
    campaigns.pause_campaign(campaign.id)
    assert drain(pipeline)["links"] == [0]
    assert message_counts(campaign.id) == {"queued": 5}
    # Resuming enqueues the fan-out again; it picks up the rest.
    campaigns.resume_campaign(campaign.id, pipeline.tasks)
    assert sum(drain(pipeline)["links"]) == 7
    assert message_counts(campaign.id) == {"queued": 12}


def test_rows_made_by_the_fan_out_carry_the_model_defaults(pipeline):
    """fan_out_batch inserts with raw SQL: every defaulted column is filled."""
    campaign = new_campaign(seed_contacts(2))
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    drain(pipeline)
    row = Message.get_by_id(message1_ids(campaign.id)[0])
    for name, field in Message._meta.fields.items():
        if field.default is None or callable(field.default) or name == "status":
            continue
        assert getattr(row, name) == field.default, name
    assert (row.kind, row.status, row.priority) == (1, "queued", 0)
    assert row.body == "Bonjour Contact 0 de Lyon"
    key = campaigns.idempotency_key(campaign.id, row.contact_id, 1)
    assert row.idempotency_key == key
    assert row.created_at == row.enqueued_at is not None


def test_a_big_campaign_fans_out_in_two_chains_over_disjoint_ranges(pipeline):
    # 230 members, batches of 5: above 2 x 20 batches, so two chains.
    campaign = new_campaign(seed_contacts(230))
    campaigns.start_campaign(campaign.id, pipeline.tasks)

    huey = pipeline.queues.messages
    first = huey.dequeue()
    assert huey.execute(first) == BATCH
    links = [t for t in _pending(huey) if t.name == FANOUT]
    # The first chain's next link (up to the middle), and the second chain
    # from the middle to the end.
    assert sorted(len(t.args) for t in links) == [2, 3]
    result = drain(pipeline)

    assert sum(result["links"]) == 230 - BATCH
    assert message_counts(campaign.id) == {"queued": 230}
    ids = message1_ids(campaign.id)
    assert len(ids) == 230
    assert sorted(result["sends"]) == ids
    assert all(count == 1 for count in result["sends"].values())
    assert campaigns.campaign_summary(campaign.id)["messages"]["message1"] == {
        "queued": 230
    }


def _pending(huey):
    return [huey.deserialize_task(data) for data in huey.storage.enqueued_items()]
