"""Recording a send: on PostgreSQL one statement, one round trip (issue 15).

The row and its member move together, and the member moves only when the
row's update matched (the lease still ours): a lost lease moves nothing.
SQLite keeps its transaction (BEGIN, two UPDATEs, COMMIT) with the same
outcome, so each test runs on both.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from daemon.domain import campaigns
from daemon.domain.campaigns import sending
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.send_helpers import close_db
from tests.send_helpers import mode_config
from tests.send_helpers import open_db
from tests.send_helpers import running_campaign

OWNER = "host:1:abc"


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, make_config):
    db = open_db(mode_config(request, make_config, request.param))
    try:
        with db.connection_context():
            yield db
    finally:
        close_db(db)


def _message1(campaign_id: int, contact_id: int) -> int:
    return (
        Message.select(Message.id)
        .where(Message.campaign == campaign_id, Message.contact == contact_id)
        .scalar()
    )


def _states(contact_id: int) -> dict[int, str]:
    rows = CampaignContact.select(CampaignContact.campaign, CampaignContact.state)
    rows = rows.where(CampaignContact.contact == contact_id).tuples()
    return dict(rows)


class _Counting(psycopg.Cursor):
    """Every statement this connection sends, BEGIN and COMMIT included: in
    psycopg 3 one `execute` is one round trip."""

    sent: list[str] = []

    def execute(self, query, *args, **kwargs):
        _Counting.sent.append(str(query).split()[0].upper())
        return super().execute(query, *args, **kwargs)


def _record_counting(db, *args) -> list[str]:
    """record_sent(*args); on PostgreSQL the statements it sent."""
    if database.param != "%s":
        campaigns.record_sent(*args)
        return []
    conn = db.connection()
    conn.cursor_factory, _Counting.sent = _Counting, []
    try:
        campaigns.record_sent(*args)
    finally:
        conn.cursor_factory = psycopg.Cursor
    return _Counting.sent


def test_a_message1_send_is_one_statement_and_moves_its_member_only(db):
    campaign_id, ids = running_campaign(5, 0)
    other_id, _ = running_campaign(2, 5)
    # The same contact in another campaign, pending too: not moved.
    CampaignContact.insert(
        campaign=other_id, contact=ids[2], state=MemberState.PENDING
    ).execute()
    claimed = campaigns.claim(_message1(campaign_id, ids[2]), OWNER, 60)
    sent_at = utcnow()
    statements = _record_counting(db, claimed, OWNER, "p-1", "w-1", sent_at)
    if database.param == "%s":
        assert statements == ["WITH"]  # no BEGIN, no COMMIT
    row = Message.get_by_id(claimed.id)
    assert (row.status, row.provider_id, row.wa_id, row.lease_owner) == (
        "sent",
        "p-1",
        "w-1",
        None,
    )
    assert row.sent_at == sent_at
    assert _states(ids[2]) == {campaign_id: "message_1_sent", other_id: "pending"}
    member = CampaignContact.get(campaign=campaign_id, contact=ids[2])
    assert member.message1_sent_at == sent_at
    # Every other member of the campaign stays pending.
    pending = CampaignContact.select().where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.state == MemberState.PENDING,
    )
    assert pending.count() == 4


def test_a_lost_lease_records_nothing_and_moves_no_member(db):
    campaign_id, ids = running_campaign(3, 0)
    claimed = campaigns.claim(_message1(campaign_id, ids[0]), OWNER, 60)
    # The sweep took the row away (an expired lease): unconfirmed, no owner.
    Message.update(status="unconfirmed", lease_owner=None).where(
        Message.id == claimed.id
    ).execute()
    statements = _record_counting(db, claimed, OWNER, "p-late", None)
    if database.param == "%s":
        assert statements == ["WITH"]
    row = Message.get_by_id(claimed.id)
    assert (row.status, row.provider_id, row.sent_at) == ("unconfirmed", None, None)
    assert _states(ids[0]) == {campaign_id: "pending"}
    # Another worker holds it now: the same.
    Message.update(status="sending", lease_owner="other:2:x").where(
        Message.id == claimed.id
    ).execute()
    campaigns.record_sent(claimed, OWNER, "p-late", None)
    assert Message.get_by_id(claimed.id).lease_owner == "other:2:x"
    assert _states(ids[0]) == {campaign_id: "pending"}


def test_a_webhook_that_got_further_keeps_its_status(db):
    # A status webhook marked the row delivered while the send was in flight:
    # the record keeps that status and still moves the member (as before).
    campaign_id, ids = running_campaign(2, 0)
    claimed = campaigns.claim(_message1(campaign_id, ids[1]), OWNER, 60)
    Message.update(status="delivered").where(Message.id == claimed.id).execute()
    campaigns.record_sent(claimed, OWNER, "p-2", "w-2")
    row = Message.get_by_id(claimed.id)
    assert (row.status, row.provider_id, row.lease_owner) == ("delivered", "p-2", None)
    assert _states(ids[1]) == {campaign_id: "message_1_sent"}


def _message2_claimed(campaign_id: int, contact_id: int):
    first = Message.get_by_id(_message1(campaign_id, contact_id))
    Message.update(status="sent").where(Message.id == first.id).execute()
    CampaignContact.update(state=MemberState.INTERACTED).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.contact == contact_id,
    ).execute()
    second = Message.create(
        campaign=campaign_id,
        contact=contact_id,
        kind=2,
        phone=first.phone,
        body="Merci !",
        idempotency_key=f"{first.idempotency_key}-2",
    )
    return campaigns.claim(second.id, OWNER, 60)


def test_a_message2_send_is_one_statement_and_completes_the_campaign(db):
    campaign_id, ids = running_campaign(1, 0)
    claimed = _message2_claimed(campaign_id, ids[0])
    other_id, (other_contact,) = running_campaign(1, 1)
    lost = _message2_claimed(other_id, other_contact)
    Message.update(lease_owner="other:2:x").where(Message.id == lost.id).execute()
    statements = _record_counting(db, claimed, OWNER, "p-3", "w-3")
    if database.param == "%s":
        # The record, then the campaign's completion check (as before).
        assert statements[0] == "WITH" and "BEGIN" not in statements[:1]
    assert Message.get_by_id(claimed.id).status == "sent"
    assert _states(ids[0]) == {campaign_id: "message_2_sent"}
    assert Campaign.get_by_id(campaign_id).status == CampaignStatus.COMPLETED
    # Its lease lost, a Message 2 moves nothing and completes nothing.
    campaigns.record_sent(lost, OWNER, "p-4", None)
    assert Message.get_by_id(lost.id).status == "sending"
    assert _states(lost.contact_id) == {lost.campaign_id: "interacted"}
    assert Campaign.get_by_id(lost.campaign_id).status == CampaignStatus.RUNNING


def test_the_one_statement_reads_one_member_without_statistics(db):
    # The member's lookup in the statement keeps (contact, state), as the
    # statement alone does (tests/integration/test_send_member_plan.py).
    if database.param != "%s":
        pytest.skip("SQLite records in a transaction: its plan is tested there")
    campaign_id, ids = running_campaign(300, 0)
    claimed = campaigns.claim(_message1(campaign_id, ids[150]), OWNER, 60)
    sql, params = sending._record_sent_statement(type(database.obj), 1)
    now = utcnow()
    real = {
        sending._AT: now,
        sending._CAMPAIGN_ID: campaign_id,
        sending._CONTACT_ID: ids[150],
    }
    with database.atomic() as txn:
        (plan,) = database.execute_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + sql,
            ("p", "w", now, claimed.id, OWNER, *[real.get(p, p) for p in params]),
        ).fetchone()
        txn.rollback()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    read, nodes = {}, [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        if "Scan" in node["Node Type"] and "Relation Name" in node:
            rows = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            read[node["Relation Name"]] = read.get(node["Relation Name"], 0) + rows
        nodes += node.get("Plans", [])
    assert read == {"message": 1, "campaign_contact": 1}, json.dumps(plan, indent=1)


def test_a_failure_moves_its_row_and_member_together_or_neither(db, monkeypatch):
    """record_failure: the row and its member in one transaction. A fault
    between the two writes (here the member's update raising, as a kill
    there would stop it) leaves neither, so the campaign cannot be left with
    a failed row and a member open for good."""
    campaign_id, ids = running_campaign(3, 0)
    first = campaigns.claim(_message1(campaign_id, ids[0]), OWNER, 60)

    def cut(*args):
        raise RuntimeError("killed between the two writes")

    with monkeypatch.context() as patch:
        patch.setattr(sending, "member_failed", cut)
        with pytest.raises(RuntimeError):
            sending.record_failure(first, OWNER, "131026 not on WhatsApp")
    assert Message.get_by_id(first.id).status == "sending"
    assert _states(ids[0]) == {campaign_id: "pending"}
    # Without the fault both move.
    assert sending.record_failure(first, OWNER, "131026 not on WhatsApp")
    assert Message.get_by_id(first.id).status == "failed"
    assert _states(ids[0]) == {campaign_id: "failed"}
