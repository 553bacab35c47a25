"""A campaign resumed after a pause (or its failed rows retried): who gets
what, in which order.

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

from daemon.app import service
from daemon.domain import campaigns
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.event_helpers import Events
from tests.event_helpers import wassenger_reply
from tests.send_helpers import drop_queue
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


def test_retry_failed_sends_a_failed_message_2_before_the_message_1s(pipeline, fake):
    """`campaign retry-failed` after a provider outage queued its rows the
    same way, all at the lowest priority in id order: the Message 2 of the
    contact who had written waited behind every Message 1 retried."""
    tasks = pipeline.tasks
    contact_ids = seed_contacts(6)
    phones = [Contact.get_by_id(c).phone for c in contact_ids]
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, tasks)
    first, *others = campaigns.fan_out(campaign.id)
    assert tasks.deliver(first) == "sent"
    assert Events(tasks).apply("wassenger", wassenger_reply(phones[0], "Oui")) == [
        "reply: message_2_queued"
    ]
    # The provider turns down everything until the attempts are used up.
    fake.configure(fail_rate=1.0)
    (message2,) = Message.select().where(Message.kind == 2)
    for message_id in [*others, message2.id]:
        while tasks.deliver(message_id).startswith("retry"):
            Message.update(next_attempt_at=None).where(
                Message.id == message_id
            ).execute()
    assert Message.select().where(Message.status == "failed").count() == 6
    fake.configure(fail_rate=0.0)
    accepted_before = len(fake.messages())
    # The entries of those sends were consumed long ago.
    drop_queue(pipeline.queues.messages)
    drop_queue(pipeline.queues.retry)

    assert service.campaign_action(campaign.id, "retry-failed", tasks) == {"retried": 6}
    run_queue(pipeline.queues.messages)
    run_queue(pipeline.queues.retry)

    assert [phone_shows(fake, p) for p in phones] == [{"m1": 1, "m2": 1}] + [
        {"m1": 1, "m2": 0}
    ] * 5
    retried = [(m["phone"], m["kind"]) for m in fake.messages()[accepted_before:]]
    assert retried[0] == (phones[0], "m2")
