"""Tasks.deliver's error branches against a real HTTP provider.

Meta's Graph API is stood in for by a loopback server that answers the error
code under test for one recipient (the real MetaProvider client maps it);
the interrupted-attempts branch uses the fake Wassenger provider. What is
checked is what a user sees: the row, the member, the contact, the campaign.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.store.models import MemberState
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.event_helpers import GraphStub
from tests.event_helpers import campaign
from tests.event_helpers import contact
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.event_helpers import message_of
from tests.event_helpers import meta_provider_config
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

MODES = ["sqlite", "pgqueue"]
PAUSE_CODES = [131048, 132015, 132016]


@pytest.fixture
def graph():
    stub = GraphStub()
    yield stub
    stub.close()


@pytest.fixture(params=MODES)
def meta(request, make_config, graph):
    cfg = mode_config(request, make_config, request.param, meta_provider_config(graph))
    pipeline = build_pipeline(cfg)
    yield pipeline
    pipeline.close()


@pytest.fixture
def wassenger(make_config, fake):
    pipeline = build_pipeline(
        make_config("sqlite", {"provider": {"base_url": fake.url}})
    )
    yield pipeline
    pipeline.close()


def running(pipeline, count: int, name: str = "c"):
    contacts = seed_contacts(count)
    created = new_campaign(contacts, name=name)
    campaigns.start_campaign(created.id, pipeline.tasks)
    pipeline.tasks.fan_out(created.id)
    return created.id, contacts, [message_of(created.id, c).id for c in contacts]


# ---------------------------------------------------------------- opted out


def test_recipient_opted_out_on_send_opts_the_contact_out(meta, graph):
    cid, contacts, ids = running(meta, 3)
    # The same contact queued in a second campaign.
    other = new_campaign(contacts[:1], name="other")
    campaigns.start_campaign(other.id, meta.tasks)
    meta.tasks.fan_out(other.id)
    graph.fail(message(ids[0]).phone, 131050)

    outcome = meta.tasks.deliver(ids[0])

    assert outcome == "failed: opted out"
    row = message(ids[0])
    assert row.status == "failed" and "131050" in row.error
    assert row.lease_owner is None
    assert contact(contacts[0]).opted_out_at is not None
    assert member_state(cid, contacts[0]) in (MemberState.FAILED, MemberState.OPTED_OUT)
    assert message_of(other.id, contacts[0]).status == "cancelled"
    assert member_state(other.id, contacts[0]) == MemberState.OPTED_OUT
    # The others still go out.
    assert meta.tasks.deliver(ids[1]) == "sent"
    assert contact(contacts[1]).opted_out_at is None
    assert campaign(cid).status == "running"


# ---------------------------------------------------------------- pause codes


@pytest.mark.parametrize("code", PAUSE_CODES)
def test_pause_code_on_send_pauses_and_gives_the_row_back(meta, graph, code):
    cid, contacts, ids = running(meta, 3)
    graph.fail(message(ids[0]).phone, code)
    before = message(ids[0])

    outcome = meta.tasks.deliver(ids[0])

    assert outcome == "campaign paused"
    paused = campaign(cid)
    assert paused.status == "paused"
    assert str(code) in paused.status_reason
    row = message(ids[0])
    assert row.status == "queued"
    assert row.lease_owner is None and row.lease_expires_at is None
    assert row.attempts == before.attempts  # a pause is not an attempt
    assert member_state(cid, contacts[0]) == MemberState.PENDING
    assert contact(contacts[0]).opted_out_at is None
    # A paused campaign sends nothing more.
    assert meta.tasks.deliver(ids[1]) == "not claimable"
    assert message(ids[1]).status == "queued"


@pytest.mark.parametrize("status, code", [(401, 190), (403, 10)])
def test_a_refused_token_pauses_instead_of_failing_every_member(
    meta, graph, status, code
):
    """A wrong or expired provider.token: no contact's fault. Before, every
    Message 1 failed, and the campaign completed with nobody reached."""
    cid, contacts, ids = running(meta, 2)
    for row_id in ids:
        graph.fail(message(row_id).phone, code, status)

    assert meta.tasks.deliver(ids[0]) == "campaign paused"

    paused = campaign(cid)
    assert paused.status == "paused"
    assert f"HTTP {status}" in paused.status_reason
    assert "refused provider.token" in paused.status_reason
    assert [message(i).status for i in ids] == ["queued", "queued"]
    assert [member_state(cid, c) for c in contacts] == [MemberState.PENDING] * 2
    # The token fixed and the campaign resumed: both go out.
    graph.errors.clear()
    campaigns.resume_campaign(cid, meta.tasks)
    assert [meta.tasks.deliver(i) for i in ids] == ["sent", "sent"]


def test_a_refused_token_pauses_on_wassenger_too(make_config, fake):
    fake.configure(token="the-right-token")
    provider = {"base_url": fake.url, "token": "an-old-token"}
    pipeline = build_pipeline(make_config("sqlite", {"provider": provider}))
    try:
        cid, contacts, ids = running(pipeline, 1)
        assert pipeline.tasks.deliver(ids[0]) == "campaign paused"
        assert "HTTP 401" in campaign(cid).status_reason
        assert message(ids[0]).status == "queued"
        assert member_state(cid, contacts[0]) == MemberState.PENDING
        assert fake.stats()["sends_accepted"] == 0
    finally:
        pipeline.close()


@pytest.mark.parametrize("code", PAUSE_CODES)
def test_pause_code_when_the_campaign_was_paused_meanwhile(meta, graph, code):
    """Paused by the operator (or by another worker's send) while this send
    was in flight: the row goes back to queued and nothing raises."""
    cid, contacts, ids = running(meta, 3)
    phone = message(ids[0]).phone
    graph.fail(phone, code)

    def pause_first(payload: dict) -> None:
        with database.connection_context():
            campaigns.pause_campaign(cid, "operator: checking the template")

    graph.before = pause_first

    outcome = meta.tasks.deliver(ids[0])  # must not raise StateError

    assert outcome == "campaign paused"
    assert campaign(cid).status == "paused"
    row = message(ids[0])
    assert row.status == "queued"
    assert row.lease_owner is None and row.lease_expires_at is None
    assert member_state(cid, contacts[0]) == MemberState.PENDING


def test_second_send_of_a_paused_campaign_is_not_claimed(meta, graph):
    cid, contacts, ids = running(meta, 2)
    graph.fail(message(ids[0]).phone, 131048)
    assert meta.tasks.deliver(ids[0]) == "campaign paused"
    requests = len(graph.requests)
    assert meta.tasks.deliver(ids[1]) == "not claimable"
    assert len(graph.requests) == requests


# ---------------------------------------------------------------- interrupted


def interrupt(message_id: int, times: int) -> None:
    """Claims cut short, as by workers killed before they wrote the request:
    the supervisor gives each row back (queued) when it reaps the worker."""
    for n in range(times):
        claimed = campaigns.claim(message_id, f"dead-host:{n}:x", 60.0, utcnow())
        assert claimed is not None, n
        assert campaigns.release_leases(campaigns.process_key("dead-host", n)) == 1


def test_too_many_interrupted_attempts_fail_the_row(wassenger, fake):
    cid, contacts, ids = running(wassenger, 2)
    interrupt(ids[0], campaigns.MAX_INTERRUPTED_ATTEMPTS)
    assert message(ids[0]).attempts == campaigns.MAX_INTERRUPTED_ATTEMPTS

    assert wassenger.tasks.deliver(ids[0]) == "failed"

    row = message(ids[0])
    assert row.status == "failed"
    assert row.error == "too many interrupted attempts"
    assert row.lease_owner is None
    assert member_state(cid, contacts[0]) == MemberState.FAILED
    assert fake.stats()["sends_accepted"] == 0  # never handed to the provider
    assert campaign(cid).status == "running"


def test_interrupted_attempts_up_to_the_limit_still_send(wassenger, fake):
    cid, contacts, ids = running(wassenger, 1)
    interrupt(ids[0], campaigns.MAX_INTERRUPTED_ATTEMPTS - 1)

    assert wassenger.tasks.deliver(ids[0]) == "sent"

    row = message(ids[0])
    assert row.status == "sent"
    assert row.attempts == campaigns.MAX_INTERRUPTED_ATTEMPTS
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_1_SENT
    assert fake.stats()["sends_accepted"] == 1
