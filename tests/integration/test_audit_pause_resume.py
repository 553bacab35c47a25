"""A campaign resumed after a pause: who gets what, in which order.

A contact who replies while the campaign is paused gets their Message 2 on
resume. The resume enqueued every waiting row of the campaign as one task a
row, all at the lowest priority, in id order: the Message 2s (made last)
queued behind every Message 1 still to go. The person who wrote waited
for the whole backlog of cold contacts (tens of minutes for a big one),
where a Message 2 otherwise goes before any Message 1.

Real parts: the send path and the webhook ingest on the real database and
queues (SQLite + SqliteHuey, PostgreSQL + Redis), the fake Wassenger server
on loopback; the queue is run in the order a consumer pops it.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.event_helpers import Events
from tests.event_helpers import wassenger_reply
from tests.send_helpers import manual_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import phone_shows
from tests.send_helpers import run_queue
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

pipeline = manual_pipeline(utcnow().replace(microsecond=0))


def test_a_reply_during_a_pause_is_answered_first_on_resume(pipeline, fake):
    tasks = pipeline.tasks
    contact_ids = seed_contacts(6)
    phones = [Contact.get_by_id(c).phone for c in contact_ids]
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, tasks)
    first, *others = campaigns.fan_out(campaign.id)
    assert tasks.deliver(first) == "sent"
    # The operator pauses; the queue's entries find the campaign paused.
    campaigns.pause_campaign(campaign.id, "checking the wording")
    run_queue(pipeline.queues.messages)
    assert phone_shows(fake, phones[0]) == {"m1": 1, "m2": 0}
    # The first contact answers meanwhile: their Message 2 waits too.
    assert Events(tasks).apply("wassenger", wassenger_reply(phones[0], "Oui")) == [
        "reply: message_2_queued"
    ]
    run_queue(pipeline.queues.messages)
    assert Message.select().where(Message.status == "queued").count() == 6

    campaigns.resume_campaign(campaign.id, tasks)
    run_queue(pipeline.queues.messages)

    # Everyone has what they are owed, and the person who wrote is answered
    # before the Message 1s of the contacts still waiting go out.
    assert [phone_shows(fake, p) for p in phones] == [{"m1": 1, "m2": 1}] + [
        {"m1": 1, "m2": 0}
    ] * 5
    order = [(m["phone"], m["kind"]) for m in fake.messages()]
    assert order[:2] == [(phones[0], "m1"), (phones[0], "m2")]
