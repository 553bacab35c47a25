"""A 1,000-contact campaign completes in every storage mode, each contact once.

Real `campaignd worker` subprocesses (messages, and background for the other
three queues, reading a config file) consume the real queues: embedded
(SQLite + SqliteHuey), cluster (PostgreSQL + Redis) and PostgreSQL +
PostgresHuey. The provider is the fake Wassenger
server, which counts what it accepted per reference.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.store.models import MemberState
from daemon.store.models import Message
from tests.send_helpers import assert_each_reference_once
from tests.send_helpers import build_pipeline
from tests.send_helpers import member_counts
from tests.send_helpers import message_counts
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import running_workers
from tests.send_helpers import seed_contacts
from tests.send_helpers import wait_all_sent
from tests.send_helpers import wait_with_logs

CONTACTS = 1000


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sqlite", "cluster", "pgqueue"])
@pytest.mark.timeout(120)
def test_campaign_of_1000_sends_message_1_once_to_everyone(
    request, make_config, tmp_path, mode
):
    with FakeProvider(FakeOptions(ack_delays_ms=())) as fake:
        cfg = mode_config(
            request, make_config, mode, {"provider": {"base_url": fake.url}}
        )
        pipeline = build_pipeline(cfg)
        try:
            campaign = new_campaign(seed_contacts(CONTACTS))
            # As the supervisor runs them: messages, and the other three
            # queues in one worker:background process.
            roles = ["messages", "background"]
            with running_workers(cfg, roles, tmp_path / "logs") as workers:
                campaigns.start_campaign(campaign.id, pipeline.tasks)
                try:
                    wait_all_sent(campaign.id, CONTACTS, timeout=90)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{workers_log(workers)}") from None
                wait_with_logs(
                    lambda: pipeline.queues.messages.pending_count() == 0,
                    workers,
                    timeout=10,
                    what="the messages queue to drain",
                )
            assert all(w.proc.returncode == 0 for w in workers), workers_log(workers)

            assert member_counts(campaign.id) == {MemberState.MESSAGE_1_SENT: CONTACTS}
            assert message_counts(campaign.id) == {"sent": CONTACTS}
            rows = list(Message.select().where(Message.campaign == campaign.id))
            assert {m.attempts for m in rows} == {1}
            assert all(m.provider_id and m.sent_at for m in rows)
            # Waiting for replies: not complete until they come or expire.
            assert campaigns.get_campaign(campaign.id).status == "running"

            stats = fake.stats()
            assert stats["requests"] == CONTACTS
            assert stats["duplicate_requests"] == 0
            assert_each_reference_once(stats, fake.messages(), CONTACTS)
            references = {m["reference"] for m in fake.messages()}
            assert references == {m.idempotency_key for m in rows}
            by_reference = {m["reference"]: m for m in fake.messages()}
            for message in rows:
                sent = by_reference[message.idempotency_key]
                text = sent.get("body", sent.get("message"))
                assert (sent["phone"], text) == (message.phone, message.body)
                assert sent["id"] == message.provider_id
        finally:
            pipeline.close()


def workers_log(workers) -> str:
    return "\n".join(f"--- {w.queue} pid {w.pid}\n{w.log()}" for w in workers)
