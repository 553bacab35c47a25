"""Reply outcomes: the cases that failed against the first build.

A second reply from a member who already replied was recorded as
"no_open_campaign" (no campaign on the interaction row) instead of
"already_interacted": the member lookup of handle_reply (now
campaigns.replies._take_member_for_reply) only looks at members in pending /
message_1_sent / expired, so its "already" answer was reached only by two
concurrent replies on PostgreSQL; _answered_member now gives it.
Same setup as test_reply_outcomes.py.
"""

from __future__ import annotations

import pytest

from daemon.store.models import MemberState
from tests.event_helpers import interactions
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.integration import test_reply_outcomes as base

pytestmark = pytest.mark.timeout(60)

# The fixtures and setup of the passing tests.
PROVIDERS = base.PROVIDERS
pipeline = base.pipeline
messages_2, outcomes, reply = base.messages_2, base.outcomes, base.reply
result, running = base.result, base.running


@pytest.mark.parametrize("provider", PROVIDERS)
def test_second_reply_is_already_interacted(pipeline, provider):
    cid, contacts, ids = running(pipeline, 1, sent=1)
    phone = message(ids[0]).phone
    first = reply(pipeline, provider, phone, "oui")
    second = reply(pipeline, provider, phone, "oui oui, vraiment")

    assert result(first) == "reply: message_2_queued"
    assert result(second) == "reply: already_interacted"
    assert len(messages_2(cid)) == 1
    assert outcomes(contacts[0]) == ["message_2", "already"]
    assert interactions(contacts[0])[1].campaign_id == cid
    assert member_state(cid, contacts[0]) == MemberState.INTERACTED


def test_reply_after_message_2_sent_is_already_interacted(pipeline):
    cid, contacts, ids = running(pipeline, 2, sent=2)
    phone = message(ids[0]).phone
    reply(pipeline, "wassenger", phone, "oui")
    (second,) = messages_2(cid)
    assert pipeline.tasks.deliver(second.id) == "sent"

    late = reply(pipeline, "wassenger", phone, "merci !")

    assert result(late) == "reply: already_interacted"
    assert len(messages_2(cid)) == 1
    assert member_state(cid, contacts[0]) == MemberState.MESSAGE_2_SENT
