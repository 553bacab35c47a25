"""SIGKILL a worker mid-send: no phone gets a message twice, nothing is lost.

A real `campaignd worker --queue messages` with several threads sends to the
fake provider, which answers after 400 ms and, like the real providers,
sends a message whose request it received whole even if the client is gone,
and does not dedupe a repeated reference. Pacing (one slot every 100 ms)
keeps some claimed rows waiting for their slot, not yet written. Then the
worker is SIGKILLed, and the test does what the supervisor does when it
reaps a worker (`Tasks.release_dead_worker` with the worker's in-flight
records), and what the scheduler does (the sweep, every second here):

- rows claimed but never written go back to `queued` and are sent again at
  once by a fresh worker, without waiting for any confirm window;
- rows on the wire become `unconfirmed`: the fake's status webhooks (posted
  to a web server in this process, processed by a real `worker:default`)
  confirm them, and nothing is re-sent;
- with statuses that never come, `provider.confirm_window_s` later the
  policy applies: "resend" sends them once more (same reference), "fail"
  fails them.

The verdicts read the fake's per-phone counts: what the contacts' phones
show, not what requests were made.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest

from daemon.app.tasks import Tasks
from daemon.domain import campaigns
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.runtime import inflight_dir
from daemon.runtime import read_inflight
from daemon.runtime import read_taken
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.helpers import wait_for
from tests.send_helpers import build_pipeline
from tests.send_helpers import member_counts
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import running_workers
from tests.send_helpers import seed_contacts
from tests.send_helpers import sent_count
from tests.send_helpers import start_worker
from tests.send_helpers import wait_pg_sessions_gone
from tests.send_helpers import wait_with_logs

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow

CONTACTS = 60
THREADS = 6
SECRET = "kill-test-secret"
SENT_OR_LATER = ("sent", "delivered", "read")


class WebInThread:
    """The web role's app in this process: the fake posts its webhooks here;
    each stored event is enqueued for a real `worker:default`."""

    def __init__(self, cfg):
        self.queues = make_queues(cfg)
        self.server = WebServer(create_app(cfg, Tasks(cfg, self.queues)), cfg, port=0)
        self.thread = self.server.serve_in_thread()
        self.url = self.server.url

    def close(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self.queues.close()


def held_by(campaign_id: int, worker) -> list[int]:
    """Rows of the campaign the worker holds (`sending`, its lease)."""
    query = Message.select(Message.id, Message.lease_owner).where(
        Message.campaign == campaign_id, Message.status == "sending"
    )
    return sorted(m.id for m in query if worker.owns(m.lease_owner))


def rows_of(campaign_id: int) -> dict[int, Message]:
    query = Message.select().where(Message.campaign == campaign_id, Message.kind == 1)
    return {m.id: m for m in query}


def phones_of(ids) -> dict[int, str]:
    query = (
        Message.select(Message.id, Contact.phone)
        .join(Contact)
        .where(Message.id.in_(list(ids)))
    )
    return {m.id: m.contact.phone for m in query}


def m1_per_phone(fake, phones) -> dict[str, int]:
    counts = fake.phone_counts()
    return {p: counts.get(p, {}).get("m1", 0) for p in phones}


def kill_mid_send(cfg, pipeline, campaign_id, workers):
    """Wait until the victim has sends on the wire and claimed rows waiting
    for their pacing slot, SIGKILL it, release its rows as the supervisor
    does. (on the wire, never left)."""
    victim = workers[0]
    directory = inflight_dir(cfg.data_path)

    def ready() -> bool:
        held = set(held_by(campaign_id, victim))
        wire = held & read_inflight(directory, victim.pid)
        return sent_count(campaign_id) >= 5 and len(wire) >= 2 and held - wire

    wait_with_logs(ready, workers, 30, "sends on the wire and rows waiting")
    pg_port = urlparse(cfg.database_url).port if cfg.database_url else None
    pg_ports = victim.tcp_ports_to(pg_port) if pg_port else set()
    victim.kill()
    # Its last statement may still commit on the PG server.
    wait_pg_sessions_gone(pg_ports)
    held = held_by(campaign_id, victim)
    wire = read_inflight(directory, victim.pid)
    host = victim.lease_owner.split(":")[0]
    released = pipeline.tasks.release_dead_worker(host, victim.pid, wire)
    # As the supervisor's release goes on (recovery.LeaseReleaser): the
    # tasks its threads had taken, rows not claimed yet, enqueued again.
    skip = wire | {m for m, _ in released.requeued}
    pipeline.tasks.resume_taken(read_taken(directory, victim.pid), skip)
    on_wire = sorted(set(held) & wire)
    never_left = sorted(set(held) - wire)
    # A status webhook may confirm a row on the wire before the release
    # reads it (it is then sent, not unconfirmed): never more than on_wire.
    assert released.unconfirmed <= len(on_wire)
    statuses = {m.id: m.status for m in Message.select().where(Message.id.in_(on_wire))}
    assert set(statuses.values()) <= {"unconfirmed", *SENT_OR_LATER}, statuses
    assert sorted(m for m, _ in released.requeued) == never_left
    assert on_wire, "no send was on the wire at the kill"
    assert never_left, "no claimed row was waiting at the kill"
    return on_wire, never_left


def sweep_while(pipeline, done, timeout: float, what: str, workers=()) -> None:
    """Run the sweep every second, as the scheduler would, until `done()`;
    a timeout's message carries the `workers`' logs."""
    next_sweep = 0.0

    def check() -> bool:
        nonlocal next_sweep
        if done():
            return True
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + 1.0
            pipeline.tasks.sweep_once()
        return False

    wait_with_logs(check, list(workers), timeout, what)


def sweep_until_all_sent(pipeline, campaign_id: int, workers) -> None:
    """Sweep until every Message 1 of the campaign is sent (60 s at most)."""
    sweep_while(
        pipeline,
        lambda: sent_count(campaign_id) == CONTACTS,
        60,
        "every Message 1 sent",
        workers,
    )


def run_kill_scenario(request, make_config, tmp_path, mode, fake_options, extra):
    """Start a campaign, SIGKILL the sending worker mid-send, release its rows,
    start a fresh worker. Yields what the test judges."""
    fake = FakeProvider(fake_options).start()
    request.addfinalizer(fake.stop)
    base = {
        "provider": {"base_url": fake.url, "timeout_s": 5.0},
        "web": {"webhook_secret": SECRET},
        "workers": {"messages_threads": THREADS},
        # One slot every 100 ms: claimed rows wait for theirs, unwritten.
        "pacing": {"per_minute": 600.0, "daily_cap": 0},
        "scheduler": {"sweep_s": 1.0},
    }
    for table, values in extra.items():
        base.setdefault(table, {}).update(values)
    cfg = mode_config(request, make_config, mode, base)
    pipeline = build_pipeline(cfg)
    request.addfinalizer(pipeline.close)
    web = WebInThread(cfg)
    request.addfinalizer(web.close)
    fake.configure(webhook_url=f"{web.url}/webhooks/wassenger", webhook_secret=SECRET)
    campaign = new_campaign(seed_contacts(CONTACTS))
    return cfg, fake, pipeline, campaign


@pytest.mark.parametrize("mode", ["sqlite", "cluster"])
@pytest.mark.timeout(120)
def test_sigkill_mid_send_no_phone_gets_message_1_twice(
    request, make_config, tmp_path, mode
):
    """Rows on the wire end sent by their status webhooks, never re-sent; the
    rows that never left are sent again at once; every phone gets Message 1
    exactly once."""
    options = FakeOptions(latency_ms=400, ack_delays_ms=(200.0, 400.0))
    # A window far longer than the test: nothing here may wait for it.
    extra = {"provider": {"confirm_window_s": 600.0}}
    cfg, fake, pipeline, campaign = run_kill_scenario(
        request, make_config, tmp_path, mode, options, extra
    )
    logs = tmp_path / "logs"
    with running_workers(cfg, ["messages", "background"], logs) as workers:
        campaigns.start_campaign(campaign.id, pipeline.tasks)
        on_wire, never_left = kill_mid_send(cfg, pipeline, campaign.id, workers)
        killed_at = time.monotonic()
        workers.append(start_worker(cfg, "messages", logs, tag="-new"))

        rows = rows_of(campaign.id)
        assert {rows[i].status for i in on_wire} <= {"unconfirmed", *SENT_OR_LATER}

        # The rows that never left are sent again at once, long before any
        # confirm window.
        def never_left_sent() -> bool:
            rows = rows_of(campaign.id)
            return all(rows[i].status in SENT_OR_LATER for i in never_left)

        wait_with_logs(never_left_sent, workers, 20, "the rows that never left sent")
        assert time.monotonic() - killed_at < 20
        sweep_until_all_sent(pipeline, campaign.id, workers)

    rows = rows_of(campaign.id)
    phones = phones_of(rows)
    per_phone = m1_per_phone(fake, phones.values())
    print(
        f"{mode}: {len(on_wire)} on the wire, {len(never_left)} never left; "
        f"{fake.stats()['requests']} requests"
    )
    # What the phones show: Message 1 once each, the cut-off sends included.
    assert fake.duplicates() == {}
    assert set(per_phone.values()) == {1}, per_phone
    assert member_counts(campaign.id) == {MemberState.MESSAGE_1_SENT: CONTACTS}
    for message_id in on_wire:
        row = rows[message_id]
        assert row.status in SENT_OR_LATER  # confirmed by its status webhook
        assert not row.resends and row.attempts == 1
    for message_id in never_left:
        assert rows[message_id].attempts == 2  # claimed twice, written once


@pytest.mark.timeout(120)
def test_sigkill_mid_batch_no_phone_gets_message_1_twice(
    request, make_config, tmp_path
):
    """Unpaced sends go out in batches; on SQLite a batch's accepted sends are
    recorded together at its end (on PostgreSQL each at once, as the test
    above). A worker of one thread killed mid-batch
    holds rows accepted but not recorded, one on the wire, and rows not sent
    yet: its in-flight records name every one of the first two kinds, which
    end sent by their status webhooks, never re-sent; the rest go again at
    once. Every phone gets Message 1 exactly once."""
    # Fast enough for a batch to send several rows within its budget.
    options = FakeOptions(latency_ms=40, ack_delays_ms=(200.0, 400.0))
    extra = {
        "provider": {"confirm_window_s": 600.0},
        "pacing": {"per_minute": 0.0, "daily_cap": 0},
        # One thread: two ids in the in-flight records are two of one batch.
        "workers": {"messages_threads": 1},
    }
    cfg, fake, pipeline, campaign = run_kill_scenario(
        request, make_config, tmp_path, "sqlite", options, extra
    )
    logs = tmp_path / "logs"
    with running_workers(cfg, ["messages", "background"], logs) as workers:
        campaigns.start_campaign(campaign.id, pipeline.tasks)
        on_wire, never_left = kill_mid_send(cfg, pipeline, campaign.id, workers)
        assert len(on_wire) >= 2, "no batch had sends accepted and not recorded"
        workers.append(start_worker(cfg, "messages", logs, tag="-new"))
        sweep_until_all_sent(pipeline, campaign.id, workers)

    rows = rows_of(campaign.id)
    per_phone = m1_per_phone(fake, phones_of(rows).values())
    print(f"{len(on_wire)} on the wire, {len(never_left)} never left")
    assert fake.duplicates() == {}
    assert set(per_phone.values()) == {1}, per_phone
    assert member_counts(campaign.id) == {MemberState.MESSAGE_1_SENT: CONTACTS}
    for message_id in on_wire:
        row = rows[message_id]
        assert row.status in SENT_OR_LATER and not row.resends and row.attempts == 1


@pytest.mark.parametrize(
    ("mode", "policy"),
    [
        ("sqlite", "resend"),
        ("cluster", "resend"),
        ("sqlite", "fail"),
        ("cluster", "fail"),
    ],
)
@pytest.mark.timeout(120)
def test_sigkill_mid_send_with_statuses_that_never_come(
    request, make_config, tmp_path, mode, policy
):
    """The rows on the wire wait `provider.confirm_window_s` (5 s) for evidence
    that never comes, then are re-sent once ("resend") or failed ("fail")."""
    options = FakeOptions(latency_ms=400, status_loss_share=1.0)
    extra = {"provider": {"confirm_window_s": 5.0, "unconfirmed": policy}}
    cfg, fake, pipeline, campaign = run_kill_scenario(
        request, make_config, tmp_path, mode, options, extra
    )
    logs = tmp_path / "logs"
    with running_workers(cfg, ["messages", "background"], logs) as workers:
        campaigns.start_campaign(campaign.id, pipeline.tasks)
        on_wire, never_left = kill_mid_send(cfg, pipeline, campaign.id, workers)
        killed_at = time.monotonic()
        workers.append(start_worker(cfg, "messages", logs, tag="-new"))

        def settled() -> bool:
            counts = {}
            for row in rows_of(campaign.id).values():
                counts[row.status] = counts.get(row.status, 0) + 1
            done = sum(counts.get(s, 0) for s in (*SENT_OR_LATER, "failed"))
            return done == CONTACTS

        # Early sweeps change nothing for the unconfirmed rows.
        sweep_while(
            pipeline,
            lambda: time.monotonic() - killed_at > 3.0,
            10,
            "3 s of sweeps",
        )
        rows = rows_of(campaign.id)
        assert all(rows[i].status == "unconfirmed" for i in on_wire)
        sweep_while(pipeline, settled, 60, "every row sent or failed", workers)
        if policy == "resend":
            # The re-sends are sent by the fresh worker, then nothing more.
            wait_for(
                lambda: not pipeline.queues.messages.pending_count(),
                10,
                what="the re-sends taken by the worker",
            )
            pipeline.tasks.sweep_once()

    rows = rows_of(campaign.id)
    phones = phones_of(rows)
    per_phone = m1_per_phone(fake, phones.values())
    print(f"{mode}/{policy}: {len(on_wire)} on the wire, {len(never_left)} never left")
    wire_phones = {phones[i] for i in on_wire}
    for phone, count in per_phone.items():
        if phone not in wire_phones:
            assert count == 1, (phone, count)
    for message_id in on_wire:
        row, phone = rows[message_id], phones[message_id]
        if policy == "resend":
            # Once more, same reference: the phone may show it twice (the
            # first request did reach the fake), never three times.
            assert row.status in SENT_OR_LATER and row.resends == 1
            assert 1 <= per_phone[phone] <= 2
        else:
            assert row.status == "failed"
            assert per_phone[phone] <= 1
    for message_id in never_left:
        assert rows[message_id].status in SENT_OR_LATER
    expected = {MemberState.MESSAGE_1_SENT: CONTACTS}
    if policy == "fail":
        expected = {
            MemberState.MESSAGE_1_SENT: CONTACTS - len(on_wire),
            MemberState.FAILED: len(on_wire),
        }
    assert member_counts(campaign.id) == expected


def test_a_draining_worker_claims_nothing_and_enqueues_the_id_again(make_config):
    """Verify `Tasks.deliver` while the worker drains: the row stays queued,
    unclaimed, and its id is back on the queue for another worker."""
    cfg = make_config("sqlite")
    pipeline = build_pipeline(cfg)
    try:
        campaign = new_campaign(seed_contacts(1))
        campaigns.start_campaign(campaign.id, pipeline.tasks)
        pipeline.tasks.fan_out(campaign.id)
        queue = pipeline.queues.messages
        (row,) = rows_of(campaign.id).values()
        queue.flush()
        pipeline.tasks.draining.set()
        outcome = pipeline.tasks.deliver(row.id)
        assert outcome.startswith("draining")
        with database.connection_context():
            again = Message.get_by_id(row.id)
        assert again.status == "queued" and again.attempts == 0
        assert again.lease_owner is None
        assert queue.pending_count() == 1
    finally:
        pipeline.close()
