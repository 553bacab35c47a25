"""Sends whose outcome is unknown: unconfirmed, reconciled, then settled.

The real send path (`Tasks`) on the real database, against the fake Wassenger
server on loopback, which (like the real providers) sends every request it
received whole, even one whose answer came too late for us, and drops no
repeated reference. Tests judge what the contact's phone shows: the messages
the fake took per phone and kind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from falcon import testing

from daemon.domain import campaigns
from daemon.roles.web.app import create_app
from daemon.runtime import INFLIGHT_CAPACITY
from daemon.runtime import InFlight
from daemon.runtime import read_inflight
from daemon.runtime import read_taken
from daemon.status import format_status
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
from daemon.supervision import status
from tests.event_helpers import Events
from tests.event_helpers import wassenger_reply
from tests.event_helpers import wassenger_status
from tests.helpers import wait_for
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import drop_queue
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import run_queue
from tests.send_helpers import seed_contacts

T0 = utcnow().replace(microsecond=0)
WINDOW_S = 60.0
DEAD_HOST, DEAD_PID = "gone-host", 999_999


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline_for(request, make_config, fake):
    built = []

    def build(policy: str = "resend", timeout_s: float = 5.0):
        extra = {
            "provider": {
                "base_url": fake.url,
                "timeout_s": timeout_s,
                "confirm_window_s": WINDOW_S,
                "unconfirmed": policy,
            }
        }
        cfg = mode_config(request, make_config, request.param, extra)
        pipeline = build_pipeline(cfg, ManualClock(T0))
        built.append(pipeline)
        return pipeline

    yield build
    for pipeline in built:
        pipeline.close()


def phone_shows(fake, phone: str) -> dict[str, int]:
    """What the contact's phone shows: messages per kind (by their text)."""
    counts = {"m1": 0, "m2": 0}
    for m in fake.messages():
        if m["phone"] == phone:
            counts["m1" if m["message"].startswith("Bonjour") else "m2"] += 1
    return counts


def one_message(pipeline):
    (contact_id,) = seed_contacts(1)
    campaign = new_campaign([contact_id])
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    (message_id,) = campaigns.fan_out(campaign.id)
    return campaign, Contact.get_by_id(contact_id), message_id


def send_too_slowly(pipeline, fake, message_id: int) -> str:
    """The provider answers after our timeout (but takes the message)."""
    fake.configure(latency_ms=1500)
    try:
        return pipeline.tasks.deliver(message_id)
    finally:
        fake.configure(latency_ms=0)


def test_an_answer_slower_than_the_timeout_leaves_the_row_unconfirmed(
    pipeline_for, fake
):
    pipeline = pipeline_for(timeout_s=0.3)
    campaign, contact, message_id = one_message(pipeline)

    outcome = send_too_slowly(pipeline, fake, message_id)

    assert outcome.startswith("unconfirmed:"), outcome
    row = Message.get_by_id(message_id)
    assert row.status == "unconfirmed" and row.unconfirmed_at == T0
    assert row.lease_owner is None and row.next_attempt_at is None
    wait_for(lambda: phone_shows(fake, contact.phone)["m1"] == 1, 5)
    # Neither a retry task nor the sweeper sends it again within the window.
    pipeline.tasks.clock.advance(WINDOW_S - 1)
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    swept = pipeline.tasks.sweep_once(now=pipeline.tasks.clock())
    assert swept["unconfirmed_resent"] == 0
    assert phone_shows(fake, contact.phone) == {"m1": 1, "m2": 0}
    assert campaigns.get_campaign(campaign.id).status == "running"
    summary = campaigns.campaign_summary(campaign.id)
    assert summary["unconfirmed"] == {"waiting": 1, "resent": 0, "failed": 0}
    # What an operator sees: `campaignd status` and /metrics.
    answer = status.FigureGatherer(pipeline.cfg).gather()
    assert "unconfirmed sends: 1 " in format_status(answer)
    client = testing.TestClient(
        create_app(pipeline.cfg, pipeline.tasks, queues=pipeline.queues)
    )
    text = client.simulate_get("/metrics").text
    assert "campaignd_messages_unconfirmed 1.0" in text.splitlines()


def test_a_status_webhook_confirms_an_unconfirmed_send(pipeline_for, fake):
    pipeline = pipeline_for(timeout_s=0.3)
    campaign, contact, message_id = one_message(pipeline)
    send_too_slowly(pipeline, fake, message_id)
    key = Message.get_by_id(message_id).idempotency_key

    events = Events(pipeline.tasks, clock=pipeline.tasks.clock)
    outcomes = events.apply("wassenger", wassenger_status("delivered", reference=key))

    assert outcomes == ["status delivered: applied"]
    row = Message.get_by_id(message_id)
    assert row.status == "delivered"
    member = campaigns.campaign_summary(campaign.id)["members"]
    assert member == {"message_1_sent": 1}
    pipeline.tasks.clock.advance(WINDOW_S * 10)
    pipeline.tasks.sweep_once(now=pipeline.tasks.clock())
    wait_for(lambda: phone_shows(fake, contact.phone)["m1"] == 1, 5)
    assert phone_shows(fake, contact.phone) == {"m1": 1, "m2": 0}


def test_a_reply_confirms_message_1_and_gets_message_2_once(pipeline_for, fake):
    pipeline = pipeline_for(timeout_s=0.3)
    campaign, contact, message_id = one_message(pipeline)
    send_too_slowly(pipeline, fake, message_id)
    events = Events(pipeline.tasks, clock=pipeline.tasks.clock)

    outcomes = events.apply("wassenger", wassenger_reply(contact.phone, "Oui"))
    outcomes += events.apply("wassenger", wassenger_reply(contact.phone, "Oui !!"))

    assert outcomes == ["reply: message_2_queued", "reply: already_interacted"]
    assert Message.get_by_id(message_id).status == "sent"
    (message2,) = Message.select().where(Message.kind == 2)
    assert pipeline.tasks.deliver(message2.id) == "sent"
    pipeline.tasks.clock.advance(WINDOW_S * 10)
    pipeline.tasks.sweep_once(now=pipeline.tasks.clock())
    wait_for(lambda: phone_shows(fake, contact.phone)["m1"] == 1, 5)
    assert phone_shows(fake, contact.phone) == {"m1": 1, "m2": 1}
    assert campaigns.get_campaign(campaign.id).status == "completed"


def test_a_reply_while_a_retry_is_pending_cancels_the_retry(pipeline_for, fake):
    # A 500 whose request the provider did take after all (it happens).
    pipeline = pipeline_for()
    campaign, contact, message_id = one_message(pipeline)
    fake.configure(fail_after_accept_rate=1.0)
    assert pipeline.tasks.deliver(message_id).startswith("retry at")
    fake.configure(fail_after_accept_rate=0.0)
    events = Events(pipeline.tasks, clock=pipeline.tasks.clock)

    outcomes = events.apply("wassenger", wassenger_reply(contact.phone, "Oui"))

    assert outcomes == ["reply: message_2_queued"]
    assert Message.get_by_id(message_id).status == "sent"
    pipeline.tasks.clock.advance(3600)
    assert pipeline.tasks.deliver(message_id) == "not claimable"
    assert phone_shows(fake, contact.phone)["m1"] == 1


def test_a_reply_to_a_message_1_never_attempted_is_ignored(pipeline_for, fake):
    pipeline = pipeline_for()
    campaign, contact, message_id = one_message(pipeline)
    events = Events(pipeline.tasks, clock=pipeline.tasks.clock)

    outcomes = events.apply("wassenger", wassenger_reply(contact.phone, "Oui"))

    assert outcomes == ["reply: no_open_campaign"]
    assert Message.get_by_id(message_id).status == "queued"
    assert not Message.select().where(Message.kind == 2).exists()


@pytest.mark.parametrize("policy", ["resend", "fail"])
def test_no_evidence_within_the_window_applies_the_policy_once(
    pipeline_for, fake, policy
):
    pipeline = pipeline_for(policy=policy, timeout_s=0.3)
    campaign, contact, message_id = one_message(pipeline)
    send_too_slowly(pipeline, fake, message_id)
    clock = pipeline.tasks.clock

    clock.advance(WINDOW_S + 1)
    swept = pipeline.tasks.sweep_once(now=clock())
    # Delivered by the queue in a worker; here, by hand.
    if policy == "resend":
        assert swept["unconfirmed_resent"] == 1
        assert pipeline.tasks.deliver(message_id) == "sent"
        expected = {"m1": 2, "m2": 0}  # the price of "resend": stated, counted
        status = "sent"
    else:
        assert swept["unconfirmed_failed"] == 1
        assert pipeline.tasks.deliver(message_id) == "not claimable"
        expected = {"m1": 1, "m2": 0}
        status = "failed"
    clock.advance(WINDOW_S * 10)
    again = pipeline.tasks.sweep_once(now=clock())
    assert again["unconfirmed_resent"] == again["unconfirmed_failed"] == 0
    wait_for(lambda: phone_shows(fake, contact.phone) == expected, 5)
    assert Message.get_by_id(message_id).status == status
    summary = campaigns.campaign_summary(campaign.id)["unconfirmed"]
    if policy == "resend":
        assert summary == {"waiting": 0, "resent": 1, "failed": 0}
    else:
        assert summary == {"waiting": 0, "resent": 0, "failed": 1}
        assert campaigns.get_campaign(campaign.id).status == "completed"


def test_evidence_stored_in_time_but_not_processed_holds_the_resend(pipeline_for, fake):
    from daemon.domain import unconfirmed
    from daemon.store.models import InboundEvent

    pipeline = pipeline_for(policy="resend", timeout_s=0.3)
    _, _, message_id = one_message(pipeline)
    send_too_slowly(pipeline, fake, message_id)
    clock = pipeline.tasks.clock
    # A status webhook stored within the window, its processing not done yet
    # (its task lost with a worker, or behind a backlog).
    clock.advance(WINDOW_S / 2)
    event = InboundEvent.create(
        provider="wassenger",
        dedupe_key="late-status",
        event_type="message:out:ack",
        payload="{}",
        received_at=clock(),
    )
    clock.advance(WINDOW_S)
    assert unconfirmed.settle(WINDOW_S, "resend", clock()).resent == []
    assert Message.get_by_id(message_id).status == "unconfirmed"
    # Processed (and it was not this row's status): now the window is over.
    InboundEvent.update(processed_at=clock()).where(
        InboundEvent.id == event.id
    ).execute()
    assert len(unconfirmed.settle(WINDOW_S, "resend", clock()).resent) == 1


def test_a_bug_in_the_send_path_leaves_the_row_unconfirmed(pipeline_for, fake):
    pipeline = pipeline_for()
    campaign, contact, message_id = one_message(pipeline)

    class Broken:
        def send(self, *args, **kwargs):
            raise ZeroDivisionError("a bug after the request was written")

    pipeline.tasks._provider = Broken()
    outcome = pipeline.tasks.deliver(message_id)

    assert outcome.startswith("unconfirmed: internal error")
    assert Message.get_by_id(message_id).status == "unconfirmed"


def test_a_dead_workers_rows_split_by_its_in_flight_records(pipeline_for, fake):
    pipeline = pipeline_for()
    contact_ids = seed_contacts(3)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    owner = f"{DEAD_HOST}:{DEAD_PID}:abcd"
    for message_id in ids:
        assert campaigns.claim(message_id, owner, 600, T0) is not None

    released = pipeline.tasks.release_dead_worker(DEAD_HOST, DEAD_PID, {ids[0]})

    assert released.unconfirmed == 1
    assert sorted(m for m, _ in released.requeued) == sorted(ids[1:])
    statuses = {m.id: m.status for m in Message.select()}
    assert statuses == {ids[0]: "unconfirmed", ids[1]: "queued", ids[2]: "queued"}
    for message_id in ids[1:]:
        assert pipeline.tasks.deliver(message_id) == "sent"
    assert pipeline.tasks.deliver(ids[0]) == "not claimable"


def test_a_dead_workers_taken_tasks_are_enqueued_again(pipeline_for, fake):
    """A worker killed after taking a task and before claiming its row: the
    queue entry died with it. The taken records it left bring the send and
    the event back when the supervisor releases it, even behind a backlog
    (where the sweeper would wait out its 30 s grace)."""
    import threading

    from daemon.app.recovery import LeaseReleaser
    from daemon.runtime import inflight_dir
    from daemon.store.models import InboundEvent
    from tests.send_helpers import phone_for

    pipeline = pipeline_for()
    contact_ids = seed_contacts(3)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    drop_queue(pipeline.queues.messages)  # whatever the fan-out enqueued: lost
    for message_id in ids[1:]:  # the backlog; ids[0]'s entry was taken
        pipeline.tasks.send_single_message(message_id)
    events = Events(pipeline.tasks)
    taken_event = events.store("wassenger", wassenger_reply(phone_for(90), "hi"))[0]
    chunk_event = events.store("wassenger", wassenger_reply(phone_for(92), "ok"))[0]
    other_event = events.store("wassenger", wassenger_reply(phone_for(91), "yo"))[0]
    drop_queue(pipeline.queues.default)  # whatever the ingest enqueued: lost
    pipeline.tasks.process_webhook_event(other_event)  # the backlog

    directory = inflight_dir(pipeline.cfg.data_path)
    dead = InFlight(directory, pid=DEAD_PID)
    dead.take("m", ids[0])
    # Another thread of the dead worker (one record file per thread), in a
    # chunk of events as the web role enqueues them.
    thread = threading.Thread(target=dead.take, args=("e", [taken_event, chunk_event]))
    thread.start()
    thread.join()

    released = LeaseReleaser(pipeline.cfg, directory).release(DEAD_PID)

    assert released[3] == 3, released
    run_queue(pipeline.queues.messages)
    run_queue(pipeline.queues.default)
    phones = [Contact.get_by_id(c).phone for c in contact_ids]
    assert [phone_shows(fake, p)["m1"] for p in phones] == [1, 1, 1]
    for event_id in (taken_event, chunk_event, other_event):
        assert InboundEvent.get_by_id(event_id).processed_at is not None
    assert read_inflight(directory, DEAD_PID) == set()  # cleared


def event_ids_queued(pipeline) -> set[int]:
    from daemon.store.queue import waiting_ids

    kinds = {"process_webhook_events": "e", "process_webhook_event": "e"}
    return waiting_ids((pipeline.queues.default,), kinds, "e", 1000)


def test_a_death_replays_what_no_queue_entry_names_behind_a_backlog(pipeline_for, fake):
    """Redis can hand a task to the connection of a worker being killed,
    which never reads it: no taken record names it. Its release enqueues
    again every due row and unprocessed event that no waiting entry names,
    even behind a backlog (a late status's task queued after the reply's),
    and does not double the ones still waiting."""
    from daemon.app.recovery import LeaseReleaser
    from daemon.runtime import inflight_dir
    from daemon.store.models import InboundEvent
    from tests.send_helpers import phone_for

    pipeline = pipeline_for()
    contact_ids = seed_contacts(3)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    drop_queue(pipeline.queues.messages)  # ids[0]'s entry: handed, never read
    for message_id in ids[1:]:
        pipeline.tasks.send_single_message(message_id)  # the backlog
    events = Events(pipeline.tasks)
    lost_event = events.store("wassenger", wassenger_reply(phone_for(90), "hi"))[0]
    waiting_event = events.store("wassenger", wassenger_reply(phone_for(91), "yo"))[0]
    # The ingest enqueues from its own thread: let it, then lose the entries.
    wait_for(
        lambda: {lost_event, waiting_event} <= event_ids_queued(pipeline),
        what="the ingest's entries",
    )
    drop_queue(pipeline.queues.default)  # the reply's entry: handed, never read
    pipeline.tasks.process_webhook_event(waiting_event)  # queued after it

    directory = inflight_dir(pipeline.cfg.data_path)
    released = LeaseReleaser(pipeline.cfg, directory).release(DEAD_PID)

    assert released[3] == 2, released  # ids[0] and lost_event, nothing else
    assert pipeline.queues.messages.pending_count() == 3
    assert pipeline.queues.default.pending_count() == 2
    run_queue(pipeline.queues.messages)
    run_queue(pipeline.queues.default)
    phones = [Contact.get_by_id(c).phone for c in contact_ids]
    assert [phone_shows(fake, p)["m1"] for p in phones] == [1, 1, 1]
    for event_id in (lost_event, waiting_event):
        assert InboundEvent.get_by_id(event_id).processed_at is not None


@pytest.mark.parametrize("entries", ["single", "batch"])
def test_a_task_popped_by_a_worker_killed_before_running_it_comes_back(
    pipeline_for, fake, entries
):
    """The consumer notes a task as taken when it pops it (inside the
    dequeue's transaction on SQLite), before Huey decodes it: a worker
    SIGKILLed right after the pop, behind a backlog, has its task enqueued
    again by the supervisor's release, not after the sweeper's grace. A
    batch of Message 1 (send_messages) comes back whole."""
    from daemon.app.recovery import LeaseReleaser
    from daemon.runtime import inflight_dir

    pipeline = pipeline_for()
    contact_ids = seed_contacts(3)
    campaign = new_campaign(contact_ids)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    drop_queue(pipeline.queues.messages)  # the start's fan-out task
    if entries == "batch":
        pipeline.tasks.send_messages(ids[:2])
        pipeline.tasks.send_messages(ids[2:])
        first = ids[:2]
    else:
        for message_id in ids:
            pipeline.tasks.send_single_message(message_id)
        first = [ids[0]]
    script = textwrap.dedent(
        """
        import json, sys, threading
        from daemon import config
        from daemon.app.tasks import Tasks
        from daemon.store.db import open_database
        from daemon.store.queue import make_queues, tell_taken
        cfg = config.load(sys.argv[1])
        open_database(cfg)
        tasks = Tasks(cfg, make_queues(cfg))
        huey = tasks.queues.get("messages")
        tell_taken(huey, tasks.taken_noter("messages"))
        task = huey.dequeue()                 # a consumer thread's pop...
        print(json.dumps(task.args[0]), flush=True)
        threading.Event().wait()              # ...and the SIGKILL
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, pipeline.cfg.source],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        popped = json.loads(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    popped = [popped] if isinstance(popped, int) else popped
    assert popped == first
    # Their entry is gone.
    assert {Message.get_by_id(i).status for i in popped} == {"queued"}
    directory = inflight_dir(pipeline.cfg.data_path)

    released = LeaseReleaser(pipeline.cfg, directory).release(proc.pid)

    assert released[3] == len(first), released  # the backlog was not drained
    run_queue(pipeline.queues.messages)
    phones = [Contact.get_by_id(c).phone for c in contact_ids]
    assert [phone_shows(fake, p)["m1"] for p in phones] == [1, 1, 1]


def test_a_delayed_task_passing_through_to_the_schedule_is_not_noted(pipeline_for):
    """A retry's backoff: Huey pops the task and puts it in its schedule
    (still safe there), it does not run it; a taken record would outlive it."""
    from daemon.runtime import clear_inflight
    from daemon.runtime import inflight_dir
    from daemon.store.queue import tell_taken

    pipeline = pipeline_for()
    huey = pipeline.queues.messages
    tell_taken(huey, pipeline.tasks.taken_noter("messages"))
    directory = inflight_dir(pipeline.cfg.data_path)
    try:
        pipeline.tasks.send_single_message.schedule((41,), delay=600)
        pipeline.tasks.send_single_message(42)
        assert huey.dequeue().args == (41,)
        assert read_taken(directory, os.getpid()) == set()
        assert huey.dequeue().args == (42,)
        assert read_taken(directory, os.getpid()) == {("m", 42)}
    finally:
        clear_inflight(directory, os.getpid())


def test_taken_records_hold_a_chunk_of_ids_and_are_cleared(tmp_path):

    directory = str(tmp_path / "inflight")
    record = InFlight(directory, pid=DEAD_PID)
    record.take("e", [10**9 + i for i in range(8)])  # a web chunk, long ids
    assert read_taken(directory, DEAD_PID) == {("e", 10**9 + i) for i in range(8)}
    record.take("m", 7)  # the thread's next task replaces the record whole
    assert read_taken(directory, DEAD_PID) == {("m", 7)}
    record.take("e", range(100))  # more than fits: the first ones, whole
    taken = read_taken(directory, DEAD_PID)
    assert taken and taken == {("e", i) for i in range(len(taken))}
    record.untake()
    assert read_taken(directory, DEAD_PID) == set()


def test_in_flight_records_hold_a_batch_until_it_ends(tmp_path):
    """A batch begins its sends one after the other and ends them together,
    once recorded: until then every one of them reads as in flight."""
    directory = str(tmp_path / "inflight")
    record = InFlight(directory, pid=DEAD_PID)
    longest = 10**19  # 20 digits
    batch = [longest + i for i in range(INFLIGHT_CAPACITY)]
    for message_id in batch:
        record.begin(message_id)
    assert read_inflight(directory, DEAD_PID) == set(batch)
    with pytest.raises(ValueError, match="in flight"):
        record.begin(1)
    record.take("m", 5)  # the task record is apart from the ids
    assert read_inflight(directory, DEAD_PID) == set(batch)
    record.end()
    assert read_inflight(directory, DEAD_PID) == set()
    record.begin(8)  # a lone send after the batch: only its own id
    assert read_inflight(directory, DEAD_PID) == {8}


def test_in_flight_records_of_an_older_version_are_read(tmp_path):
    """A file written before batches held one id and the taken record, no
    more: read after an upgrade, it means what it meant."""
    directory = tmp_path / "inflight"
    directory.mkdir()
    (directory / f"{DEAD_PID}.1.0").write_bytes(
        b"77".ljust(23) + b"\n" + b"m78".ljust(255) + b"\n"
    )
    assert read_inflight(str(directory), DEAD_PID) == {77}
    assert read_taken(str(directory), DEAD_PID) == {("m", 78)}


def test_in_flight_records_survive_a_sigkill(tmp_path):
    directory = str(tmp_path / "inflight")
    script = textwrap.dedent(
        f"""
        import sys, threading
        from daemon.runtime import InFlight
        log = InFlight({directory!r})
        log.begin(41); log.end()              # sent and recorded
        log.begin(40); log.keep()             # sent, recording failed
        log.begin(39); log.end()              # the next send of that thread
        log.begin(42)                         # on the wire at the kill
        def batch():
            log.begin(50); log.begin(51); log.end()   # recorded together
            log.begin(52); log.begin(53)              # accepted, on the wire
        t = threading.Thread(target=batch); t.start(); t.join()
        def other():
            log.begin(43)
            print("ready", flush=True)
        t = threading.Thread(target=other); t.start(); t.join()
        threading.Event().wait()              # until the SIGKILL
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_inflight(directory, proc.pid) == {40, 42, 43, 52, 53}
    assert read_inflight(directory, proc.pid + 1) == set()
    local = InFlight(directory)
    local.begin(7)
    assert read_inflight(directory, os.getpid()) == {7}
    local.end()
    assert read_inflight(directory, os.getpid()) == set()


def test_an_unconfirmed_row_of_a_contact_who_opted_out_is_not_resent(
    pipeline_for, fake
):
    pipeline = pipeline_for(timeout_s=0.3)
    campaign, contact, message_id = one_message(pipeline)
    send_too_slowly(pipeline, fake, message_id)
    campaigns.opt_out_contact(contact, "replied 'STOP'")
    clock = pipeline.tasks.clock

    clock.advance(WINDOW_S + 1)
    swept = pipeline.tasks.sweep_once(now=clock())

    assert swept["unconfirmed_resent"] == 0
    assert Message.get_by_id(message_id).status == "cancelled"
    assert campaigns.get_campaign(campaign.id).status == "completed"
    wait_for(lambda: phone_shows(fake, contact.phone)["m1"] == 1, 5)
    assert phone_shows(fake, contact.phone) == {"m1": 1, "m2": 0}
