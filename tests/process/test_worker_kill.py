"""SIGKILL a worker mid-send: nothing is lost, nothing is delivered twice.

A real `campaignd worker --queue messages` with several threads sends to the
fake provider at 200 ms per call, so sends are in flight when it is killed.
Then, as the supervisor does, its leases are released and the sweeper runs,
and a fresh worker finishes the campaign. The provider must end with every
reference accepted exactly once; re-sends of a reference it already took are
allowed (it dedupes them), deliveries twice are not.
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlparse

import pytest

from daemon import campaigns
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.helpers import wait_for
from tests.send_helpers import assert_each_reference_once
from tests.send_helpers import build_pipeline
from tests.send_helpers import member_counts
from tests.send_helpers import message_counts
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import running_workers
from tests.send_helpers import seed_contacts
from tests.send_helpers import sent_count
from tests.send_helpers import start_worker
from tests.send_helpers import wait_all_sent
from tests.send_helpers import wait_pg_sessions_gone
from tests.send_helpers import wait_with_logs
from tests.send_helpers import worker_logs

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow

CONTACTS = 150
THREADS = 6


def in_flight(campaign_id: int, owner: str) -> list[int]:
    query = Message.select(Message.id).where(
        Message.campaign == campaign_id,
        Message.status == "sending",
        Message.lease_owner == owner,
    )
    return sorted(m.id for m in query)


def sweep_until_all_sent(pipeline, campaign_id: int, timeout: float) -> None:
    """Run the sweep as its periodic job would (30 s later) until all are sent."""

    def sent_or_swept() -> bool:
        if sent_count(campaign_id) == CONTACTS:
            return True
        if not pipeline.queues.messages.pending_count():
            late = utcnow() + dt.timedelta(seconds=31)
            pipeline.tasks.sweep_once(now=late)
        return False

    try:
        wait_for(sent_or_swept, timeout, interval=0.2)
    except AssertionError:
        wait_all_sent(campaign_id, CONTACTS, timeout=0)  # the readable failure


@pytest.mark.parametrize("mode", ["sqlite", "cluster"])
@pytest.mark.timeout(120)
def test_sigkilled_worker_loses_nothing_and_delivers_nothing_twice(
    request, make_config, tmp_path, mode
):
    # dedupe=True: the cut-short sends are re-sent under their reference and
    # this test counts on the provider absorbing them.
    options = FakeOptions(latency_ms=200, ack_delays_ms=(), dedupe=True)
    with FakeProvider(options) as fake:
        extra = {
            "provider": {"base_url": fake.url},
            "workers": {"messages_threads": THREADS},
        }
        cfg = mode_config(request, make_config, mode, extra)
        pipeline = build_pipeline(cfg)
        pg_port = urlparse(cfg.database_url).port if mode != "sqlite" else None
        try:
            campaign = new_campaign(seed_contacts(CONTACTS))
            logs = tmp_path / "logs"
            with running_workers(cfg, ["messages", "retry"], logs) as workers:
                victim = workers[0]
                campaigns.start_campaign(campaign.id, pipeline.tasks)
                wait_with_logs(
                    lambda: (
                        sent_count(campaign.id) >= 20
                        and len(in_flight(campaign.id, victim.lease_owner)) >= 3
                    ),
                    workers,
                    timeout=30,
                    what="sends in flight in the first worker",
                )
                pg_ports = victim.tcp_ports_to(pg_port) if pg_port else set()
                victim.kill()
                # Its last statement may still commit on the PG server.
                wait_pg_sessions_gone(pg_ports)
                stranded = in_flight(campaign.id, victim.lease_owner)
                # The kill did cut sends short (their tasks are gone with it).
                assert stranded, "no send was in flight at the kill"
                assert sent_count(campaign.id) < CONTACTS

                workers.append(start_worker(cfg, "messages", logs, tag="-new"))
                # What the supervisor does on seeing the worker die.
                assert campaigns.release_leases(victim.lease_owner) == len(stranded)
                # The sweeper brings the cut-short rows back at once...
                swept = pipeline.tasks.sweep_once()
                assert swept["messages"] >= len(stranded)
                # ...and, once the backlog is drained, rows whose task was
                # popped but never claimed (the periodic sweep, run early).
                try:
                    sweep_until_all_sent(pipeline, campaign.id, timeout=60)
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}\nstranded {stranded}\n{worker_logs(workers)}"
                    ) from None

            assert message_counts(campaign.id) == {"sent": CONTACTS}
            assert member_counts(campaign.id) == {MemberState.MESSAGE_1_SENT: CONTACTS}
            query = Message.select().where(Message.campaign == campaign.id)
            rows = {m.id: m for m in query}
            for message_id in stranded:
                assert rows[message_id].attempts == 2
            others = set(rows) - set(stranded)
            assert {rows[i].attempts for i in others} == {1}

            stats = fake.stats()
            print(
                f"{mode}: {len(stranded)} sends cut short, "
                f"{stats['duplicate_requests']} re-sent and deduped"
            )
            # Every message reached the provider, and each only once.
            assert_each_reference_once(stats, fake.messages(), CONTACTS)
            # Only the cut-short sends were asked again (and deduped).
            assert stats["duplicate_requests"] <= len(stranded)
            assert stats["requests"] == CONTACTS + stats["duplicate_requests"]
        finally:
            pipeline.close()
