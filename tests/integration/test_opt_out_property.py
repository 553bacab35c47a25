"""Property: no sequence of send outcomes, opt-outs, retries, crashes and sweeps
ever makes a provider request for a contact who had opted out before it.

Hypothesis draws the sequences; each example gets a fresh campaign on the real
database and the real send path, against the fake provider on loopback.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

DEAD_HOST, DEAD_PID = "gone-host", 999999
DEAD_OWNER = f"{DEAD_HOST}:{DEAD_PID}:dead"
LIVE_OWNER = "this-host:1:pacer"
CONTACTS = 2
_numbers = itertools.count(500_000)


class WatchingProvider:
    """The real provider client, noting every request to an opted-out contact."""

    def __init__(self, inner):
        self.inner = inner
        self.outcome = "accept"
        self.stop_during: Contact | None = None
        self.violations: list[str] = []

    def send(self, phone, *args, **kwargs):
        contact = Contact.get(Contact.phone == phone)
        if contact.opted_out_at is not None:
            self.violations.append(
                f"request to {phone}, opted out {contact.opted_out_at}"
            )
        if self.stop_during is not None:
            campaigns.opt_out_contact(self.stop_during, "replied 'STOP' mid-send")
            self.stop_during = None
        return self.inner.send(phone, *args, **kwargs)


STEP = st.one_of(
    st.tuples(
        st.just("deliver"),
        st.integers(0, 3),
        st.sampled_from(["accept", "server_error", "rate_limited"]),
        st.booleans(),
    ),
    st.tuples(st.just("stop"), st.integers(0, CONTACTS - 1)),
    st.tuples(st.just("reply"), st.integers(0, CONTACTS - 1)),
    st.tuples(st.just("crash"), st.integers(0, 3)),
    st.tuples(st.just("pace_release"), st.integers(0, 3)),
    st.just(("supervisor_release",)),
    st.just(("retry_failed",)),
    st.just(("sweep",)),
    st.tuples(st.just("advance"), st.sampled_from([1, 60, 600, 7200])),
)


@pytest.fixture
def world(make_config):
    with FakeProvider(FakeOptions(ack_delays_ms=(), dedupe=False)) as fake:
        cfg = make_config(
            "sqlite",
            {"provider": {"base_url": fake.url}, "retry": {"max_attempts": 3}},
        )
        pipeline = build_pipeline(cfg, ManualClock(utcnow().replace(microsecond=0)))
        watcher = WatchingProvider(pipeline.provider)
        pipeline.tasks._provider = watcher
        try:
            yield pipeline, fake, watcher
        finally:
            pipeline.close()


class Run:
    """One example: a fresh campaign of CONTACTS contacts, and the steps."""

    def __init__(self, pipeline, fake, watcher):
        self.tasks, self.fake, self.watcher = pipeline.tasks, fake, watcher
        self.clock = pipeline.tasks.clock
        contact_ids = seed_contacts(CONTACTS, start=next(_numbers) * CONTACTS)
        self.contacts = [Contact.get_by_id(i) for i in contact_ids]
        self.campaign = new_campaign(contact_ids)
        campaigns.start_campaign(self.campaign.id, self.tasks)
        campaigns.fan_out(self.campaign.id)

    def rows(self) -> list[int]:
        query = Message.select(Message.id).where(Message.campaign == self.campaign.id)
        return [m.id for m in query.order_by(Message.id)]

    def pick(self, index: int) -> int:
        ids = self.rows()
        return ids[index % len(ids)]

    def deliver(self, index, outcome, stop_during):
        message_id = self.pick(index)
        self.fake.configure(
            fail_rate=1.0 if outcome == "server_error" else 0.0,
            rate_limit_rate=1.0 if outcome == "rate_limited" else 0.0,
        )
        if stop_during:
            row = Message.get_by_id(message_id)
            self.watcher.stop_during = Contact.get_by_id(row.contact_id)
        self.tasks.deliver(message_id)
        self.watcher.stop_during = None

    def stop(self, index):
        contact = Contact.get_by_id(self.contacts[index].id)
        campaigns.opt_out_contact(contact, "replied 'STOP'")

    def reply(self, index):
        campaigns.handle_reply(
            self.contacts[index].phone,
            "Oui",
            is_group=False,
            window_h=24,
            opt_out_keywords=["STOP"],
            now=self.clock(),
        )

    def crash(self, index):
        campaigns.claim(self.pick(index), DEAD_OWNER, 120, self.clock())

    def pace_release(self, index):
        claimed = campaigns.claim(self.pick(index), LIVE_OWNER, 120, self.clock())
        if claimed is not None:
            later = self.clock() + dt.timedelta(seconds=30)
            campaigns.release(claimed, LIVE_OWNER, later, "paced", later)

    def supervisor_release(self):
        stranded = Message.select(Message.id).where(
            Message.lease_owner == DEAD_OWNER, Message.status == "sending"
        )
        ids = [m.id for m in stranded]
        self.tasks.release_dead_worker(DEAD_HOST, DEAD_PID, set())
        # The release stamps the wall clock: catch up with it.
        self.clock.set(max(self.clock(), utcnow() + dt.timedelta(seconds=1)))
        for message_id in ids:
            self.tasks.deliver(message_id)

    def retry_failed(self):
        campaigns.retry_failed(self.campaign.id, self.tasks)
        for message_id in self.rows():
            self.tasks.deliver(message_id)

    def sweep(self):
        found = campaigns.sweep(self.clock(), include_queued=True)
        for message_id, _ in found.messages:
            self.tasks.deliver(message_id)

    def advance(self, seconds):
        self.clock.advance(seconds)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_no_request_ever_reaches_an_opted_out_contact(world, steps):
    run = Run(*world)
    for name, *args in steps:
        getattr(run, name)(*args)

    assert run.watcher.violations == []
    # And the rows of opted-out contacts are never left waiting to be sent.
    for contact in run.contacts:
        if Contact.get_by_id(contact.id).opted_out_at is not None:
            waiting = Message.select().where(
                Message.contact == contact.id, Message.status == "queued"
            )
            assert not waiting.exists()
