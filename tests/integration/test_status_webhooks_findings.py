"""Status webhooks on real rows: the cases that FAIL against the current code.

A `failed` status on a sent Message 1 fails the row but leaves the member in
message_1_sent (campaigns._member_failed only moves pending and interacted
members), so the member is never final and its campaign never completes.
Same setup as test_status_webhooks_rows.py.
"""

from __future__ import annotations

import pytest

from daemon.store.models import MemberState
from tests.event_helpers import campaign
from tests.event_helpers import contact
from tests.event_helpers import member_id
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.event_helpers import snapshot
from tests.event_helpers import wassenger_failed
from tests.event_helpers import without
from tests.integration import test_status_webhooks_rows as base

pytestmark = pytest.mark.timeout(60)

# The fixtures and setup of the passing tests.
wassenger = base.wassenger
running = base.running


def test_failed_on_a_sent_row_fails_the_message_and_the_member(wassenger):
    cid, contacts, ids = running(wassenger, 2, sent=1)
    key = message(ids[0]).idempotency_key
    before = snapshot()

    (outcome,) = wassenger.events.apply("wassenger", wassenger_failed(reference=key))
    assert outcome == "status failed: applied"
    row = message(ids[0])
    assert row.status == "failed" and row.failed_at is not None
    assert "not on WhatsApp" in (row.error or "")
    assert member_state(cid, contacts[0]) == MemberState.FAILED
    # Not an opt-out, and the other member is untouched.
    assert contact(contacts[0]).opted_out_at is None
    assert campaign(cid).status == "running"
    changed = {"messages": [ids[0]], "members": [member_id(cid, contacts[0])]}
    assert without(snapshot(), **changed) == without(before, **changed)


def test_failed_on_the_last_open_row_completes_the_campaign(wassenger):
    cid, contacts, ids = running(wassenger, 1, sent=1)
    key = message(ids[0]).idempotency_key
    wassenger.events.apply("wassenger", wassenger_failed(reference=key))
    assert message(ids[0]).status == "failed"
    assert member_state(cid, contacts[0]) == MemberState.FAILED
    assert campaign(cid).status == "completed"
