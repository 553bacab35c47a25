"""health:status_webhooks: sends go out, no status webhook comes back (issue 13).

A provider whose status webhooks are not registered (or lost) never tells us
a send arrived: unconfirmed sends are never reconciled. The health check
alerts when sends were accepted in the last hour and no status webhook
arrived in that hour, and resolves once statuses come again. Injected clock,
real SQLite, the fake provider for the provider part of the check.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from daemon.app import jobs
from daemon.app.tasks import Tasks
from daemon.domain import campaigns
from daemon.domain import monitoring
from daemon.domain.alerts import active_alerts
from daemon.providers import make_provider
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.roles.web.webhooks import event_type_of
from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.queue import make_queues

pytestmark = pytest.mark.timeout(60)

NOON = dt.datetime(2025, 3, 10, 12, 0)
KEY = "health:status_webhooks"
_keys = itertools.count(1)

# What the webhook endpoint stores as event_type for these items.
WASSENGER_ACK = event_type_of("wassenger", {"event": "message:out:ack"})
WASSENGER_REPLY = event_type_of("wassenger", {"event": "message:in:new"})
META_STATUS = event_type_of("meta", {"status": {"status": "delivered"}})
META_REPLY = event_type_of("meta", {"message": {"type": "text"}})


@pytest.fixture
def tasks(make_config):
    with FakeProvider(FakeOptions(ack_delays_ms=())) as fake:
        cfg = make_config("sqlite", {"provider": {"base_url": fake.url, "token": "t"}})
        db = open_database(cfg, migrate_schema=True)
        queues = make_queues(cfg)
        provider = make_provider(cfg.provider)
        yield Tasks(cfg, queues, provider, sleep=lambda s: None)
        provider.close()
        queues.close()
        db.close()


def sends(n: int, at: dt.datetime) -> None:
    """``n`` Message 1 rows accepted by the provider at ``at``."""
    contacts = [
        Contact.create(phone=f"+336123{next(_keys):05d}", name="c") for _ in range(n)
    ]
    campaign = campaigns.create_campaign(
        "c", "Bonjour", "Merci", [c.id for c in contacts]
    )
    Campaign.update(status=CampaignStatus.RUNNING).where(
        Campaign.id == campaign.id
    ).execute()
    for contact in contacts:
        Message.create(
            campaign=campaign.id,
            contact=contact,
            kind=1,
            phone=contact.phone,
            body="Bonjour",
            idempotency_key=campaigns.idempotency_key(campaign.id, contact.id, 1),
            status=MessageStatus.SENT,
            created_at=at,
            sent_at=at,
        )


def event(event_type: str, at: dt.datetime, processed: bool = True) -> None:
    InboundEvent.create(
        provider="meta" if event_type in (META_STATUS, META_REPLY) else "wassenger",
        dedupe_key=f"test:{next(_keys)}",
        event_type=event_type,
        payload="{}",
        received_at=at,
        processed_at=at if processed else None,
    )


def check(tasks, now: dt.datetime) -> dict:
    result = jobs.run("system_health_check", tasks, now)
    details = monitoring.last_health_check()["details"]["status_webhooks"]
    details["result"] = result
    details["alerted"] = KEY in {a["key"] for a in active_alerts()}
    return details


def test_sends_without_any_status_webhook_alert_then_resolve(tasks):
    assert check(tasks, NOON) == {
        "ok": True,
        "sends": 0,
        "last_status_at": None,
        "silence_s": 3600.0,
        "result": "ok",
        "alerted": False,
    }
    # Sends half an hour ago; replies came (they are no statuses), no status.
    sends(3, NOON - dt.timedelta(minutes=30))
    event(WASSENGER_REPLY, NOON - dt.timedelta(minutes=20))
    event(META_REPLY, NOON - dt.timedelta(minutes=20))
    seen = check(tasks, NOON)
    assert seen["result"] == "failing: status_webhooks"
    assert (seen["ok"], seen["sends"], seen["alerted"]) == (False, 3, True)
    [alert] = [a for a in active_alerts() if a["key"] == KEY]
    assert "3 sends" in alert["message"] and "status webhooks" in alert["message"]
    # Still failing two minutes later: one alert, not two.
    assert check(tasks, NOON + dt.timedelta(minutes=2))["alerted"]
    assert [a["key"] for a in active_alerts()].count(KEY) == 1

    # A status webhook arrives (stored, not processed yet): resolved.
    later = NOON + dt.timedelta(minutes=4)
    event(WASSENGER_ACK, later - dt.timedelta(seconds=5), processed=False)
    seen = check(tasks, later)
    assert (seen["ok"], seen["alerted"], seen["result"]) == (True, False, "ok")
    assert seen["last_status_at"] == "2025-03-10T12:03:55Z"


def test_statuses_older_than_the_hour_do_not_count_meta_ones_do(tasks):
    event(META_STATUS, NOON - dt.timedelta(hours=2))
    sends(2, NOON - dt.timedelta(minutes=40))
    assert check(tasks, NOON)["alerted"]
    event(META_STATUS, NOON - dt.timedelta(minutes=39))
    assert not check(tasks, NOON)["alerted"]


def test_a_campaign_starting_after_a_quiet_hour_does_not_alert_at_once(tasks):
    event(WASSENGER_ACK, NOON - dt.timedelta(hours=3))
    # Sent a few minutes ago: its statuses have not had time to come.
    sends(5, NOON - dt.timedelta(minutes=5))
    seen = check(tasks, NOON)
    assert (seen["ok"], seen["sends"], seen["alerted"]) == (True, 0, False)
    # A quarter of an hour later, still nothing: the alert.
    assert check(tasks, NOON + dt.timedelta(minutes=11))["alerted"]
    # Sending stopped over an hour ago: nothing to expect any more.
    seen = check(tasks, NOON + dt.timedelta(minutes=56))
    assert (seen["ok"], seen["alerted"]) == (True, False)
