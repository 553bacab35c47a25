"""Each periodic job run with an injected clock, checked by its effect on the rows.

Real SQLite database and queue, real fake-provider HTTP server on loopback;
the tasks the jobs enqueue are executed from the real Huey queue.
"""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import metrics
from daemon.app import jobs
from daemon.app.tasks import Tasks
from daemon.domain import campaigns
from daemon.domain import monitoring
from daemon.domain.alerts import active_alerts
from daemon.domain.pacing import Pacer
from daemon.errors import InputError
from daemon.providers import make_provider
from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import DailyCounter
from daemon.store.models import HealthCheck
from daemon.store.models import Interaction
from daemon.store.models import JobRun
from daemon.store.models import Lease
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import utcnow
from daemon.store.queue import make_queues
from tests.send_helpers import mode_config

pytestmark = pytest.mark.timeout(60)

DAY = dt.date(2025, 3, 10)
NOON = dt.datetime(2025, 3, 10, 12, 0)


@pytest.fixture(params=["sqlite", "cluster"])
def env(request, make_config, fake):
    """Tasks on SQLite, or PostgreSQL + Redis, with a real provider client."""
    extra = {"provider": {"base_url": fake.url, "token": "t", "timeout_s": 2.0}}
    cfg = mode_config(request, make_config, request.param, extra)
    db = open_database(cfg, migrate_schema=True)
    queues = make_queues(cfg)
    provider = make_provider(cfg.provider)
    tasks = Tasks(cfg, queues, provider, sleep=lambda s: None)
    yield tasks
    provider.close()
    queues.close()
    db.close_all() if hasattr(db, "close_all") else db.close()


def make_campaign(n: int, status: str = CampaignStatus.RUNNING) -> Campaign:
    contacts = [
        Contact.create(phone=f"+3361234{i + 1001:04d}", name=f"c{i}") for i in range(n)
    ]
    campaign = campaigns.create_campaign(
        "c", "Bonjour {name}", "Merci", [c.id for c in contacts]
    )
    Campaign.update(status=status, started_at=NOON).where(
        Campaign.id == campaign.id
    ).execute()
    return Campaign.get_by_id(campaign.id)


def message(campaign, contact, **fields) -> Message:
    values = {
        "campaign": campaign,
        "contact": contact,
        "kind": 1,
        "phone": contact.phone,
        "body": "hi",
        "idempotency_key": campaigns.idempotency_key(
            campaign.id, contact.id, fields.get("kind", 1)
        ),
        "created_at": NOON - dt.timedelta(hours=2),
    }
    values.update(fields)
    return Message.create(**values)


def drain(tasks: Tasks, limit: int = 500) -> int:
    """Execute every task waiting in the real queues (what the workers do)."""
    executed = 0
    for _ in range(limit):
        progressed = False
        for huey in tasks.queues.all():
            # Checked first: a dequeue from an empty Redis queue blocks 1 s.
            task = huey.dequeue() if huey.pending_count() else None
            if task is not None:
                huey.execute(task)
                executed += 1
                progressed = True
        if not progressed:
            return executed
    raise AssertionError("queues did not drain")


# ------------------------------------------------------------ monitoring


def test_sync_monitoring_persists_counters_per_day_from_the_rows(env):
    campaign = make_campaign(4)
    c = list(Contact.select().order_by(Contact.id))
    late_yesterday = dt.datetime(2025, 3, 9, 23, 50)
    message(
        campaign,
        c[0],
        status="read",
        sent_at=late_yesterday,
        delivered_at=late_yesterday,
        read_at=NOON - dt.timedelta(hours=3),
    )
    message(
        campaign,
        c[1],
        status="delivered",
        sent_at=NOON - dt.timedelta(hours=1),
        delivered_at=NOON - dt.timedelta(minutes=50),
    )
    message(campaign, c[2], status="failed", failed_at=NOON - dt.timedelta(hours=1))
    message(
        campaign, c[1], kind=2, status="sent", sent_at=NOON - dt.timedelta(minutes=5)
    )
    Interaction.create(
        contact=c[1],
        campaign=campaign,
        body="oui",
        received_at=NOON - dt.timedelta(minutes=6),
    )
    Contact.update(opted_out_at=late_yesterday).where(Contact.id == c[3].id).execute()

    result = jobs.run("sync_monitoring", env, NOON)

    today = monitoring.counters_for(DAY)
    yesterday = monitoring.counters_for(DAY - dt.timedelta(days=1))
    assert today["sent"] == 2 and yesterday["sent"] == 1
    assert today["message1_sent"] == 1 and today["message2_sent"] == 1
    assert today["delivered"] == 1 and yesterday["delivered"] == 1
    assert today["read"] == 1 and today["failed"] == 1
    assert today["replies"] == 1 and yesterday["opt_outs"] == 1
    assert today["opt_outs"] == 0
    assert JobRun.get(JobRun.job == "sync_monitoring").last_result.endswith(result)

    # Idempotent: a second run rewrites the same values, it does not add.
    jobs.run("sync_monitoring", env, NOON + dt.timedelta(minutes=1))
    assert monitoring.counters_for(DAY)["sent"] == 2
    assert DailyCounter.select().where(DailyCounter.day == DAY).count() == len(
        monitoring.COUNTER_NAMES
    )
    assert monitoring.today_counters(NOON) == monitoring.counters_for(DAY)


def test_reset_daily_monitoring_starts_the_day_at_midnight_and_caps_restart(
    env, make_config
):
    midnight = dt.datetime(2025, 3, 11, 0, 0, 2)
    pacer = Pacer(
        make_config("sqlite", {"pacing": {"daily_cap": 2}}).pacing, env.pacer.device
    )
    assert pacer.decide(NOON).go and pacer.decide(NOON).go
    assert not pacer.decide(NOON).go  # the cap of the 10th is used up

    result = jobs.run("reset_daily_monitoring", env, midnight)

    new_day = monitoring.counters_for(midnight.date())
    assert set(monitoring.COUNTER_NAMES) <= set(new_day)
    assert all(v == 0 for v in new_day.values())
    assert new_day[f"cap:{env.pacer.device}"] == 0
    assert "started 2025-03-11" in result
    # Yesterday is closed (its cap row is kept as history), today's cap is new.
    assert monitoring.counters_for(DAY)[f"cap:{env.pacer.device}"] == 2
    assert pacer.decide(midnight).go
    # Running it again (catch-up, or a second leader) changes nothing.
    jobs.run("reset_daily_monitoring", env, midnight + dt.timedelta(minutes=1))
    assert monitoring.counters_for(midnight.date())[f"cap:{env.pacer.device}"] == 1


# ------------------------------------------------------------ leases


def test_cleanup_expired_locks_removes_only_what_dead_processes_left(env):
    campaign = make_campaign(3)
    c = list(Contact.select().order_by(Contact.id))
    Lease.create(
        name="job:gone", owner="h:1", expires_at=NOON - dt.timedelta(seconds=1)
    )
    Lease.create(
        name="job:alive", owner="h:2", expires_at=NOON + dt.timedelta(minutes=1)
    )
    Lease.create(name="pacing:dev", value="1741608000.0")  # no expiry: kept
    expired_lease = NOON - dt.timedelta(minutes=5)
    done = message(
        campaign,
        c[0],
        status="delivered",
        lease_owner="h:1",
        lease_expires_at=expired_lease,
    )
    sending = message(
        campaign,
        c[1],
        status="sending",
        lease_owner="h:1",
        lease_expires_at=expired_lease,
    )
    fresh = message(
        campaign,
        c[2],
        status="sent",
        lease_owner="h:3",
        lease_expires_at=NOON + dt.timedelta(minutes=1),
    )

    result = jobs.run("cleanup_expired_locks", env, NOON)

    assert sorted(lease.name for lease in Lease.select()) == ["job:alive", "pacing:dev"]
    assert Message.get_by_id(done.id).lease_owner is None
    # A sending row keeps its (expired) lease: the claim takes it over.
    assert Message.get_by_id(sending.id).lease_owner == "h:1"
    assert Message.get_by_id(fresh.id).lease_owner == "h:3"
    assert result.startswith("leases 1, message leases 1")


# ------------------------------------------------------------ recovery


def test_recover_interrupted_campaigns_after_a_crash(env, fake):
    """Rows a killed worker left behind come back and the campaign ends; a row
    whose request may have left waits for evidence before it is re-sent."""
    campaign = make_campaign(4)
    c = list(Contact.select().order_by(Contact.id))
    long_ago = NOON - dt.timedelta(minutes=30)
    # Claimed by a worker that was SIGKILLed mid-send (lease expired), on a
    # host whose supervisor did not see it die: its request may have left.
    message(
        campaign,
        c[0],
        status="sending",
        lease_owner="dead:1:x",
        lease_expires_at=NOON - dt.timedelta(minutes=1),
        enqueued_at=long_ago,
    )
    # Queued, but its queue entry was lost with the queue.
    message(campaign, c[1], status="queued", enqueued_at=long_ago)
    # c[2], c[3]: the fan-out task was lost before creating their rows.
    assert drain(env) == 0

    result = jobs.run("recover_interrupted_campaigns", env, NOON)

    assert "messages=1" in result and "campaigns=1" in result
    assert env.queues.messages.pending_count() == 2  # 1 send + 1 fan-out
    drain(env)
    statuses = [m.status for m in Message.select().order_by(Message.id)]
    assert statuses == ["unconfirmed"] + ["sent"] * 3
    assert fake.stats()["sends_accepted"] == 3
    # No status webhook and no reply within the confirm window: re-sent once.
    window = env.cfg.provider.confirm_window_s
    later = NOON + dt.timedelta(seconds=window + 1)
    assert "unconfirmed_resent=1" in jobs.run(
        "recover_interrupted_campaigns", env, later
    )
    drain(env)
    statuses = [m.status for m in Message.select().order_by(Message.id)]
    assert statuses == ["sent"] * 4, [m.error for m in Message.select()]
    assert fake.stats()["sends_accepted"] == 4
    # Nothing is left to recover: a second run enqueues nothing.
    result = jobs.run("recover_interrupted_campaigns", env, later)
    assert "messages=0" in result and "unconfirmed_resent=0" in result
    assert drain(env) == 0


def test_recover_fails_members_an_older_version_left_open_behind_failed_rows(env):
    """Before 2026-12-03 record_failure moved the row and its member in two
    commits: a kill between them left a failed row, an open member and a
    campaign that never completed. The recovery job closes such members."""
    campaign = make_campaign(3)
    c = list(Contact.select().order_by(Contact.id))
    message(campaign, c[0], status="failed")  # member left pending
    message(campaign, c[1], status="sent")
    message(campaign, c[1], kind=2, status="failed")  # member left interacted
    message(campaign, c[2], status="delivered")
    states = {c[0].id: "pending", c[1].id: "interacted", c[2].id: "expired"}
    for contact_id, state in states.items():
        CampaignContact.update(state=state).where(
            CampaignContact.contact == contact_id
        ).execute()

    result = jobs.run("recover_interrupted_campaigns", env, NOON)

    members = CampaignContact.select().order_by(CampaignContact.contact)
    assert [m.state for m in members] == ["failed", "failed", "expired"]
    assert "repaired 2" in result and result.endswith("completed 1")
    assert Campaign.get_by_id(campaign.id).status == CampaignStatus.COMPLETED


def test_recover_completes_running_campaigns_with_nothing_open(env):
    campaign = make_campaign(1)
    contact = Contact.get()
    CampaignContact.update(state=MemberState.EXPIRED).execute()
    message(campaign, contact, status="delivered")

    result = jobs.run("recover_interrupted_campaigns", env, NOON)

    assert result.endswith("completed 1")
    assert Campaign.get_by_id(campaign.id).status == CampaignStatus.COMPLETED


def test_sweep_job_enqueued_by_the_scheduler_runs_on_the_default_queue(env):
    campaign = make_campaign(1)
    message(
        campaign,
        Contact.get(),
        status="queued",
        enqueued_at=utcnow() - dt.timedelta(hours=1),
    )
    env.run_job("sweep")  # what the scheduler leader does
    assert env.queues.default.pending_count() == 1

    huey = env.queues.default
    huey.execute(huey.dequeue())  # what worker:default does

    # The send only: the member is pending because its Message 1 is not
    # sent yet, not because it lacks one, so no fan-out is needed.
    assert env.queues.messages.pending_count() == 1
    assert "messages=1" in JobRun.get(JobRun.job == "sweep").last_result


def test_a_task_run_by_a_worker_is_timed_in_the_metrics(env):
    def runs_of_run_job() -> float:
        """campaignd_task_seconds_count{task="run_job"} as /metrics shows it."""
        for family in text_string_to_metric_families(metrics.render().decode()):
            for sample in family.samples:
                if sample.name == "campaignd_task_seconds_count" and sample.labels == {
                    "task": "run_job"
                }:
                    return sample.value
        return 0.0

    before = runs_of_run_job()
    env.run_job("check_expired_interactions")
    huey = env.queues.default
    huey.execute(huey.dequeue())  # what worker:background does
    assert runs_of_run_job() == before + 1


# ------------------------------------------------------------ health


def test_system_health_check_records_then_raises_and_clears_alerts(env, fake):
    result = jobs.run("system_health_check", env, NOON)
    assert result == "ok"
    check = monitoring.last_health_check()
    assert check["ok"] is True
    details = check["details"]
    assert details["database"]["ok"] and details["database"]["latency_ms"] >= 0
    assert details["queue"]["depths"] == {
        "default": 0,
        "messages": 0,
        "retry": 0,
        "verification": 0,
    }
    assert details["provider"]["ok"]
    assert details["error_rate"] == {"ok": True, "rate": 0.0, "sent": 0, "failed": 0}
    assert details["backlog"]["ok"] and details["backlog"]["late"] == 0
    assert active_alerts() == []

    # Now break things: provider down, most sends failing, a stale backlog.
    fake.configure(down=True)
    campaign = make_campaign(40)
    contacts = list(Contact.select().order_by(Contact.id))
    for contact in contacts[:25]:
        message(
            campaign,
            contact,
            status="failed",
            failed_at=NOON - dt.timedelta(minutes=10),
        )
    for contact in contacts[25:35]:
        message(
            campaign,
            contact,
            status="delivered",
            sent_at=NOON - dt.timedelta(minutes=10),
        )
    for contact in contacts[35:]:
        message(
            campaign,
            contact,
            status="queued",
            created_at=NOON - dt.timedelta(minutes=30),
        )

    later = NOON + dt.timedelta(minutes=2)
    result = jobs.run("system_health_check", env, later)

    assert result == "failing: provider, error_rate, backlog"
    check = monitoring.last_health_check()
    assert check["ok"] is False
    assert check["details"]["error_rate"]["rate"] == pytest.approx(25 / 35, abs=1e-3)
    assert check["details"]["backlog"]["late"] == 5
    assert check["details"]["backlog"]["oldest_due"] == "2025-03-10T11:30:00Z"
    # The provider is a point probe: alerted only once it has failed for
    # alerts.down_after_s (300 s); the windowed checks alert at once.
    keys = {a["key"] for a in active_alerts()}
    assert keys == {"health:error_rate", "health:backlog"}
    jobs.run("system_health_check", env, later + dt.timedelta(minutes=2))
    assert len(active_alerts()) == 2
    jobs.run("system_health_check", env, later + dt.timedelta(minutes=6))
    # (By then the sends are old enough for health:status_webhooks too.)
    keys = {a["key"] for a in active_alerts()}
    assert keys == {
        "health:provider",
        "health:error_rate",
        "health:backlog",
        "health:status_webhooks",
    }
    # Raising again while active adds no second alert.
    jobs.run("system_health_check", env, later + dt.timedelta(minutes=8))
    assert len(active_alerts()) == 4

    # Recovery: provider back, the failures age out, the backlog is sent.
    fake.configure(down=False)
    Message.update(status=MessageStatus.SENT, sent_at=later).where(
        Message.status == MessageStatus.QUEUED
    ).execute()
    much_later = NOON + dt.timedelta(hours=2)
    assert jobs.run("system_health_check", env, much_later) == "ok"
    # The windowed alerts clear at once; the provider's after three passing
    # checks in a row.
    assert {a["key"] for a in active_alerts()} == {"health:provider"}
    for minutes in (1, 2):
        jobs.run("system_health_check", env, much_later + dt.timedelta(minutes=minutes))
    assert active_alerts() == []
    assert HealthCheck.select().count() == 8


def test_a_flapping_provider_raises_no_alert_and_a_lasting_outage_one(env, fake):
    """Down, up, down, up every minute: never down for 300 s, never alerted.
    Then down for good: one alert, after 300 s; one passing check (a lucky
    answer) does not resolve it."""
    for minute in range(8):
        fake.configure(down=minute % 2 == 0)
        jobs.run("system_health_check", env, NOON + dt.timedelta(minutes=minute))
    assert active_alerts() == []
    fake.configure(down=True)
    start = NOON + dt.timedelta(minutes=8)
    for minute in range(0, 7):
        jobs.run("system_health_check", env, start + dt.timedelta(minutes=minute))
        alerted = {a["key"] for a in active_alerts()} == {"health:provider"}
        # Failing at minute 0..6: alerted once the failure is 300 s old.
        assert alerted == (minute >= 5), minute
    fake.configure(down=False)
    jobs.run("system_health_check", env, start + dt.timedelta(minutes=7))
    fake.configure(down=True)
    jobs.run("system_health_check", env, start + dt.timedelta(minutes=8))
    assert {a["key"] for a in active_alerts()} == {"health:provider"}


def test_health_check_reports_a_provider_that_does_not_answer(env, fake):
    fake.stop()
    assert jobs.run("system_health_check", env, NOON) == "failing: provider"
    assert active_alerts() == []
    later = NOON + dt.timedelta(minutes=5)
    assert jobs.run("system_health_check", env, later) == "failing: provider"
    assert {a["key"] for a in active_alerts()} == {"health:provider"}


# ------------------------------------------------------------ interactions


def test_check_expired_interactions_then_a_late_reply_sends_no_message_2(env):
    campaign = make_campaign(2)
    old, recent = list(Contact.select().order_by(Contact.id))
    sent_25h_ago = NOON - dt.timedelta(hours=25)
    sent_1h_ago = NOON - dt.timedelta(hours=1)
    for contact, sent_at in ((old, sent_25h_ago), (recent, sent_1h_ago)):
        message(
            campaign, contact, status="delivered", sent_at=sent_at, created_at=sent_at
        )
        CampaignContact.update(
            state=MemberState.MESSAGE_1_SENT, message1_sent_at=sent_at
        ).where(CampaignContact.contact == contact.id).execute()

    assert jobs.run("check_expired_interactions", env, NOON) == "expired 1"

    def state(contact):
        return CampaignContact.get(CampaignContact.contact == contact.id).state

    assert state(old) == MemberState.EXPIRED
    assert state(recent) == MemberState.MESSAGE_1_SENT
    window = env.cfg.campaigns.reply_window_h
    keywords = env.cfg.campaigns.opt_out_keywords
    late = campaigns.handle_reply(
        old.phone,
        "oui",
        is_group=False,
        window_h=window,
        opt_out_keywords=keywords,
        now=NOON,
    )
    on_time = campaigns.handle_reply(
        recent.phone,
        "oui",
        is_group=False,
        window_h=window,
        opt_out_keywords=keywords,
        now=NOON,
    )
    assert late.message2_id is None
    assert on_time.message2_id is not None
    assert [m.contact_id for m in Message.select().where(Message.kind == 2)] == [
        recent.id
    ]


# ------------------------------------------------------------ dispatch


def test_run_rejects_an_unknown_job_and_records_results(env):
    with pytest.raises(InputError, match="unknown job 'nope'"):
        jobs.run("nope", env, NOON)
    jobs.run("check_expired_interactions", env, NOON)
    row = JobRun.get(JobRun.job == "check_expired_interactions")
    assert row.last_result == "2025-03-10T12:00:00Z expired 0"
    assert row.last_run_at == NOON
