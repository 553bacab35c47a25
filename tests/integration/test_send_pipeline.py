"""The send path end to end: claim, pacing, provider call, retries, records.

`Tasks.deliver` runs in this process with an injected clock and the real
database, queues and provider client; the provider is the fake Wassenger
server on loopback. Time-based rules (backoff, Retry-After, daily cap, send
window) are checked by moving the clock, never by sleeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time

import pytest

from daemon.domain import campaigns
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.send_helpers import ManualClock
from tests.send_helpers import assert_each_reference_once
from tests.send_helpers import build_pipeline
from tests.send_helpers import invalid_phone_for
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import running_workers
from tests.send_helpers import seed_contacts
from tests.send_helpers import sent_count
from tests.send_helpers import wait_with_logs

# Whole seconds, so that equalities with stored datetimes are exact.
T0 = utcnow().replace(microsecond=0)
# What a task that runs before its row is due answers (it is scheduled again).
NOT_DUE = "not due yet: rescheduled"


@pytest.fixture(params=["sqlite", "cluster"])
def mode(request):
    return request.param


@pytest.fixture
def pipeline_for(request, make_config, fake, mode):
    """Build the send path for this test's mode, with config overrides."""
    built = []

    def build(extra: dict | None = None, clock=None):
        extra = dict(extra or {})
        extra["provider"] = {"base_url": fake.url, **extra.get("provider", {})}
        cfg = mode_config(request, make_config, mode, extra)
        pipeline = build_pipeline(cfg, clock or ManualClock(T0))
        built.append(pipeline)
        return pipeline

    yield build
    for pipeline in built:
        pipeline.close()


def running_campaign(pipeline, count: int = 1, **kwargs):
    """A running campaign whose Message 1 rows exist; (campaign, message ids)."""
    contact_ids = kwargs.pop("contact_ids", None) or seed_contacts(count)
    campaign = new_campaign(contact_ids, **kwargs)
    campaigns.start_campaign(campaign.id, pipeline.tasks)
    ids = campaigns.fan_out(campaign.id)
    return campaign, ids


def row(message_id: int) -> Message:
    return Message.get_by_id(message_id)


def member_state(message: Message) -> str:
    return CampaignContact.get(
        CampaignContact.campaign == message.campaign_id,
        CampaignContact.contact == message.contact_id,
    ).state


def scheduled_etas(huey) -> list[dt.datetime]:
    """Etas of the queue's delayed tasks (still pending until a consumer sees them)."""
    tasks = huey.pending() + huey.scheduled()
    return sorted(task.eta for task in tasks if task.eta is not None)


# ---------------------------------------------------------------- once only


def test_deliver_called_concurrently_sends_once(pipeline_for, fake):
    pipeline = pipeline_for()
    _, ids = running_campaign(pipeline, 4)
    outcomes: dict[int, list[str]] = {i: [] for i in ids}
    barrier = threading.Barrier(6 * len(ids))

    def deliver(message_id: int) -> None:
        barrier.wait()
        try:
            outcomes[message_id].append(pipeline.tasks.deliver(message_id))
        finally:
            # Back to the pool: PostgreSQL allows 8 connections per process.
            database.close()

    threads = [
        threading.Thread(target=deliver, args=(i,)) for i in ids for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    for message_id, results in outcomes.items():
        assert sorted(results) == ["not claimable"] * 5 + ["sent"], results
        assert row(message_id).status == "sent"
    assert fake.stats()["requests"] == len(ids)
    assert_each_reference_once(fake.stats(), fake.messages(), len(ids))


@pytest.mark.timeout(60)
def test_task_enqueued_three_times_is_sent_once_by_a_worker(
    make_config, fake, tmp_path
):
    cfg = make_config(
        "sqlite",
        {"provider": {"base_url": fake.url}, "workers": {"messages_threads": 4}},
    )
    pipeline = build_pipeline(cfg)
    try:
        _, ids = running_campaign(pipeline, 30)
        for _ in range(3):
            pipeline.tasks.enqueue_sends(ids)
        with running_workers(cfg, ["messages"], tmp_path / "logs") as workers:
            # The fan-out task and 3 x 30 sends; the queue drains when all ran.
            wait_with_logs(
                lambda: (
                    pipeline.queues.messages.pending_count() == 0
                    and sent_count(row(ids[0]).campaign_id) == len(ids)
                ),
                workers,
                timeout=30,
                what="every message sent and the queue drained",
            )
        assert fake.stats()["requests"] == len(ids)
        assert_each_reference_once(fake.stats(), fake.messages(), len(ids))
        assert all(row(i).attempts == 1 for i in ids)
    finally:
        pipeline.close()


# ---------------------------------------------------------------- retries


def test_server_errors_retry_on_the_backoff_then_fail(pipeline_for, fake):
    clock = ManualClock(T0)
    pipeline = pipeline_for(
        {
            "retry": {
                "base_s": 60,
                "factor": 2,
                "cap_s": 3600,
                "jitter": 0,
                "max_attempts": 4,
            }
        },
        clock,
    )
    fake.configure(fail_rate=1.0)
    _, (message_id,) = running_campaign(pipeline)

    attempts_at = []
    for expected_gap in (60, 120, 240):
        attempts_at.append(clock())
        outcome = pipeline.tasks.deliver(message_id)
        message = row(message_id)
        next_at = clock() + dt.timedelta(seconds=expected_gap)
        assert outcome == f"retry at {next_at.isoformat()}"
        assert message.status == "queued"
        assert message.next_attempt_at == next_at
        assert "HTTP 500" in message.error
        assert member_state(message) == MemberState.PENDING
        # The retry task is due when the row is.
        assert scheduled_etas(pipeline.queues.retry)[-1] == next_at
        # One moment early, nothing is sent: the task comes back when due.
        requests = fake.stats()["requests"]
        clock.set(next_at - dt.timedelta(milliseconds=1))
        assert pipeline.tasks.deliver(message_id) == NOT_DUE
        assert fake.stats()["requests"] == requests
        clock.set(next_at)

    attempts_at.append(clock())
    assert pipeline.tasks.deliver(message_id) == "failed"
    message = row(message_id)
    assert message.status == "failed"
    assert message.failures == 3  # the 4th failure is recorded as final
    assert "(after 4 attempts)" in message.error and "HTTP 500" in message.error
    assert member_state(message) == MemberState.FAILED
    assert fake.stats()["failures_500"] == 4
    assert gaps_s(attempts_at) == [60, 120, 240]


def test_client_error_fails_at_once_with_the_providers_reason(pipeline_for, fake):
    pipeline = pipeline_for()
    contact = Contact.create(
        phone=invalid_phone_for(1), name="Nobody", variables={"city": "Lyon"}
    )
    campaign, (message_id,) = running_campaign(pipeline, contact_ids=[contact.id])

    assert pipeline.tasks.deliver(message_id) == "failed"
    message = row(message_id)
    assert message.status == "failed"
    assert "HTTP 400" in message.error and "not on WhatsApp" in message.error
    assert message.failed_at is not None and message.next_attempt_at is None
    assert member_state(message) == MemberState.FAILED
    assert fake.stats()["requests"] == 1
    assert pipeline.queues.retry.scheduled_count() == 0
    # Its only member reached a final state: the campaign is complete.
    assert campaigns.get_campaign(campaign.id).status == "completed"


def test_rate_limit_waits_exactly_retry_after(pipeline_for, fake, caplog):
    clock = ManualClock(T0)
    # Jitter on the backoff must not touch a delay the provider asked for.
    pipeline = pipeline_for({"retry": {"base_s": 60, "jitter": 0.5}}, clock)
    fake.configure(rate_limit_rate=1.0, retry_after_s=7)
    campaign, (message_id,) = running_campaign(pipeline)

    with caplog.at_level(logging.WARNING, logger="daemon.app.tasks"):
        pipeline.tasks.deliver(message_id)
    message = row(message_id)
    due = T0 + dt.timedelta(seconds=7)
    # The operator reads why, at WARNING (no phone number in the log).
    [logged] = [r for r in caplog.records if r.name == "daemon.app.tasks"]
    assert logged.levelno == logging.WARNING
    text = logged.getMessage()
    assert text.startswith(
        f"message {message_id} (campaign {campaign.id}, Message 1) not sent: "
    )
    assert "HTTP 429" in text and text.endswith(f"retry at {due.isoformat()}")
    assert message.phone not in text
    assert message.status == "queued"
    assert message.next_attempt_at == due
    assert "HTTP 429" in message.error
    assert scheduled_etas(pipeline.queues.retry) == [due]

    fake.configure(rate_limit_rate=0.0)
    clock.set(due - dt.timedelta(milliseconds=1))
    assert pipeline.tasks.deliver(message_id) == NOT_DUE
    assert fake.stats()["sends_accepted"] == 0
    clock.set(due)
    assert pipeline.tasks.deliver(message_id) == "sent"
    assert fake.stats()["failures_429"] == 1
    assert fake.stats()["sends_accepted"] == 1


def test_retry_task_is_never_due_before_the_row(pipeline_for, fake):
    # Huey keeps whole seconds: a task due before its row would find it not
    # claimable yet (it used to be dropped, and waited for the sweeper).
    clock = ManualClock(T0.replace(microsecond=700_000))
    pipeline = pipeline_for({}, clock)
    fake.configure(rate_limit_rate=1.0, retry_after_s=1)
    _, (message_id,) = running_campaign(pipeline)

    pipeline.tasks.deliver(message_id)
    (eta,) = scheduled_etas(pipeline.queues.retry)
    due = row(message_id).next_attempt_at
    assert due <= eta < due + dt.timedelta(seconds=1)


def test_retry_task_is_due_with_the_row_on_a_host_not_in_utc(
    pipeline_for, fake, monkeypatch
):
    clock = ManualClock(T0)
    pipeline = pipeline_for({}, clock)
    fake.configure(rate_limit_rate=1.0, retry_after_s=30)
    _, (message_id,) = running_campaign(pipeline)
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        pipeline.tasks.deliver(message_id)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert os.environ.get("TZ") != "Asia/Tokyo"
    assert scheduled_etas(pipeline.queues.retry) == [row(message_id).next_attempt_at]


@pytest.mark.timeout(60)
def test_retry_worker_sends_after_retry_after_without_the_sweeper(
    make_config, fake, tmp_path
):
    # Each retry is due at a fraction of a second; Huey schedules whole
    # seconds. A retry run early used to be dropped (row left to the sweeper).
    cfg = make_config(
        "sqlite",
        {"provider": {"base_url": fake.url}, "retry": {"max_attempts": 5}},
    )
    fake.configure(rate_limit_rate=1.0, retry_after_s=1)
    pipeline = build_pipeline(cfg)
    try:
        campaign, ids = running_campaign(pipeline, 20)
        pipeline.tasks.enqueue_sends(ids)
        with running_workers(cfg, ["messages", "background"], tmp_path / "logs") as ws:
            wait_with_logs(
                lambda: fake.stats()["failures_429"] >= len(ids),
                ws,
                timeout=20,
                what="a 429 for every message",
            )
            fake.configure(rate_limit_rate=0.0)
            wait_with_logs(
                lambda: sent_count(campaign.id) == len(ids),
                ws,
                timeout=15,
                what="every retry sent (no sweeper runs here)",
            )
        assert_each_reference_once(fake.stats(), fake.messages(), len(ids))
        assert all(row(i).failures >= 1 for i in ids)
    finally:
        pipeline.close()


# ---------------------------------------------------------------- leases


def test_row_whose_lease_expired_mid_send_waits_for_evidence_then_is_resent(
    pipeline_for, fake
):
    # Now, not the module's start time: the rows' enqueued_at is real time,
    # and the sweeper compares it with the clock (a start time taken minutes
    # earlier, at collection, makes the row look freshly enqueued).
    t0 = utcnow().replace(microsecond=0)
    clock = ManualClock(t0)
    pipeline = pipeline_for({}, clock)
    _, (message_id,) = running_campaign(pipeline)
    lease_s = pipeline.tasks.lease_s
    window_s = pipeline.cfg.provider.confirm_window_s
    # A worker on another host claims the row, reaches the provider, and
    # dies before recording the answer: nobody here saw it die.
    claimed = campaigns.claim(message_id, "deadhost:4242:x", lease_s, t0)
    pipeline.provider.send(
        claimed.phone, claimed.body, claimed.idempotency_key, kind=1, variables={}
    )

    clock.advance(lease_s - 1)
    assert pipeline.tasks.sweep_once()["messages"] == 0
    assert pipeline.tasks.deliver(message_id) == "not claimable"

    # The lease ran out: the request may have left, so the row is not sent
    # again; it waits for a status webhook or a reply.
    clock.set(t0 + dt.timedelta(seconds=lease_s + 1))
    assert pipeline.tasks.sweep_once()["messages"] == 0
    assert row(message_id).status == "unconfirmed"
    assert pipeline.tasks.deliver(message_id) == "not claimable"

    # No evidence within the window: re-sent once, with the same reference.
    clock.advance(window_s + 1)
    assert pipeline.tasks.sweep_once()["unconfirmed_resent"] == 1
    assert pipeline.tasks.deliver(message_id) == "sent"
    message = row(message_id)
    assert message.status == "sent" and message.resends == 1
    assert message.attempts == 2
    references = [m["reference"] for m in fake.messages()]
    assert references == [claimed.idempotency_key] * 2


# ---------------------------------------------------------------- pacing


def test_daily_cap_defers_to_next_utc_midnight_not_failed(pipeline_for, fake):
    clock = ManualClock(dt.datetime(2031, 3, 14, 22, 30))
    pipeline = pipeline_for({"pacing": {"per_minute": 0, "daily_cap": 2}}, clock)
    _, ids = running_campaign(pipeline, 3)

    outcomes = [pipeline.tasks.deliver(i) for i in ids]
    assert outcomes == ["sent", "sent", "deferred: daily cap reached"]
    midnight = dt.datetime(2031, 3, 15)
    message = row(ids[2])
    assert message.status == "queued"
    assert message.next_attempt_at == midnight
    assert (message.attempts, message.failures) == (0, 0)
    assert member_state(message) == MemberState.PENDING
    assert scheduled_etas(pipeline.queues.messages) == [midnight]

    clock.set(midnight - dt.timedelta(seconds=1))
    assert pipeline.tasks.deliver(ids[2]) == NOT_DUE
    clock.set(midnight)
    assert pipeline.tasks.deliver(ids[2]) == "sent"
    assert fake.stats()["sends_accepted"] == 3


def test_outside_the_send_window_defers_to_its_opening(pipeline_for, fake):
    # 07:30 in Paris (UTC+1 in January); the window opens at 09:00 local.
    clock = ManualClock(dt.datetime(2031, 1, 15, 6, 30))
    pipeline = pipeline_for(
        {
            "pacing": {
                "per_minute": 0,
                "daily_cap": 0,
                "window_start": "09:00",
                "window_end": "18:00",
                "timezone": "Europe/Paris",
            }
        },
        clock,
    )
    _, (message_id,) = running_campaign(pipeline)

    assert pipeline.tasks.deliver(message_id) == "deferred: outside the send window"
    opening = dt.datetime(2031, 1, 15, 8, 0)
    message = row(message_id)
    assert message.status == "queued" and message.next_attempt_at == opening
    assert message.error == "outside the send window"
    assert fake.stats()["requests"] == 0

    clock.set(opening)
    assert pipeline.tasks.deliver(message_id) == "sent"


def test_rate_waits_for_the_slot_in_the_injected_sleep(pipeline_for, fake):
    clock = ManualClock(T0)
    pipeline = pipeline_for({"pacing": {"per_minute": 30, "daily_cap": 0}}, clock)
    _, ids = running_campaign(pipeline, 3)

    assert [pipeline.tasks.deliver(i) for i in ids] == ["sent"] * 3
    # 30 per minute: slots 2 s apart, all taken at the same instant.
    assert pipeline.sleeps == [2.0, 4.0]


def test_rate_holds_across_messages_sent_back_for_their_slot(pipeline_for, fake):
    clock = ManualClock(T0)
    pipeline = pipeline_for({"pacing": {"per_minute": 12, "daily_cap": 0}}, clock)
    _, ids = running_campaign(pipeline, 5)
    sent_at = {}

    def deliver(message_id: int) -> str:
        sleeps = len(pipeline.sleeps)
        outcome = pipeline.tasks.deliver(message_id)
        if outcome == "sent":
            waited = sum(pipeline.sleeps[sleeps:])
            sent_at[message_id] = clock() + dt.timedelta(seconds=waited)
        return outcome

    # A backlog of 4 at once: 2 fit in the 5 s a thread may wait, 2 go back
    # to the queue until their own slot.
    assert [deliver(i) for i in ids[:4]] == ["sent", "sent"] + ["deferred: pacing"] * 2
    slots = [row(i).next_attempt_at for i in ids[2:4]]
    assert slots == [T0 + dt.timedelta(seconds=s) for s in (10, 15)]
    assert scheduled_etas(pipeline.queues.messages) == slots
    for message_id, slot in zip(ids[2:4], slots, strict=True):
        clock.set(slot)
        assert deliver(message_id) == "sent"
    # A newcomer queues behind the reserved slots.
    assert deliver(ids[4]) == "sent"
    times = [sent_at[i] for i in ids]
    assert gaps_s(times) == [5.0] * 4
    assert fake.stats()["sends_accepted"] == 5


def gaps_s(times) -> list[float]:
    pairs = zip(times, times[1:], strict=False)
    return [(b - a).total_seconds() for a, b in pairs]


def test_message_2_is_not_paced(pipeline_for, fake):
    # Today, before the send window opens.
    clock = ManualClock(dt.datetime.combine(utcnow().date(), dt.time(6, 30)))
    pipeline = pipeline_for(
        {
            "pacing": {
                "per_minute": 1,
                "daily_cap": 1,
                "window_start": "09:00",
                "window_end": "18:00",
            }
        },
        clock,
    )
    campaign, (message_id,) = running_campaign(pipeline)
    first = row(message_id)
    campaigns.record_sent(
        campaigns.claim(message_id, "me:1", 60, clock()), "me:1", "p1", None, clock()
    )
    reply = campaigns.handle_reply(
        first.phone,
        "oui",
        is_group=False,
        window_h=24,
        opt_out_keywords=["STOP"],
        now=clock(),
    )
    assert reply.outcome == "message_2_queued"
    assert pipeline.tasks.deliver(reply.message2_id) == "sent"
    assert pipeline.sleeps == []
    assert member_state(row(reply.message2_id)) == MemberState.MESSAGE_2_SENT
    assert campaigns.get_campaign(campaign.id).status == "completed"
