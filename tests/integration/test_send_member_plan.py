"""The member's move on each Message 1 send reads one member, whatever the
planner knows about the campaign.

Without statistics for a campaign (its members never analyzed, or analyzed
before the campaign existed), PostgreSQL costed every index that matches the
UPDATE alike and took (campaign, state, id): each send then read every
pending member of its campaign (W1 in cluster mode ~10 % slower at 5,000
members, and the cost grows with the campaign).
"""

from __future__ import annotations

import json

import pytest

from daemon.domain.campaigns import sending
from daemon.store.models import CampaignContact
from daemon.store.models import MemberState
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.send_helpers import close_db
from tests.send_helpers import mode_config
from tests.send_helpers import open_db
from tests.send_helpers import running_campaign

MEMBERS = 300


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, make_config):
    db = open_db(mode_config(request, make_config, request.param))
    try:
        yield db
    finally:
        close_db(db)


def _rows_read(campaign_id: int, contact_id: int) -> int:
    """Rows the member UPDATE looked at (PostgreSQL), rolled back."""
    sql, params = sending._member_sent_statement(type(database.obj))
    real = {
        sending._AT: utcnow(),
        sending._CAMPAIGN_ID: campaign_id,
        sending._CONTACT_ID: contact_id,
    }
    with database.atomic() as txn:
        (plan,) = database.execute_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + sql, [real.get(p, p) for p in params]
        ).fetchone()
        txn.rollback()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    read, nodes = 0, [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        if "Scan" in node["Node Type"]:
            read += node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
        nodes += node.get("Plans", [])
    return read


def _sqlite_plan() -> str:
    sql, params = sending._member_sent_statement(type(database.obj))
    rows = database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    return " ".join(str(r[-1]) for r in rows)


def test_the_member_is_found_by_its_contact_without_statistics(db):
    with db.connection_context():
        first, ids = running_campaign(MEMBERS, 0)
        if database.param == "?":
            assert "contact_id=?" in _sqlite_plan(), _sqlite_plan()
            return
        # Never analyzed.
        assert _rows_read(first, ids[MEMBERS // 2]) <= 1
        # Analyzed before the campaign existed.
        db.execute_sql("ANALYZE campaign_contact")
        second, ids = running_campaign(MEMBERS, MEMBERS)
        assert _rows_read(second, ids[MEMBERS // 2]) <= 1


def test_the_send_moves_exactly_its_member(db):
    with db.connection_context():
        campaign_id, ids = running_campaign(MEMBERS, 0)
        other_id, _ = running_campaign(MEMBERS, MEMBERS)
        # The same contact in the other campaign stays pending.
        CampaignContact.insert(
            campaign=other_id, contact=ids[3], state=MemberState.PENDING
        ).execute()
        sending._run_member_sent(utcnow(), campaign_id, ids[3])
        states = dict(
            database.execute_sql(
                "SELECT campaign_id, state FROM campaign_contact"
                f" WHERE contact_id = {database.param}",
                (ids[3],),
            ).fetchall()
        )
        assert states == {campaign_id: "message_1_sent", other_id: "pending"}
