"""Poison webhook events (issue 12): cleaned, or counted and set aside.

Webhooks go through the real ingest path (HTTP on loopback, the EventWriter),
processing runs the worker's own function (Huey execute on the real queue),
on SQLite and on PostgreSQL + Redis. A reply holding a NUL or a lone
surrogate is cleaned at parse time and processed; an event that still fails
becomes a dead letter after web.event_max_attempts, is no longer replayed by
the sweeper, and no longer stops expiry and campaign completion; it shows in
the metric, the status output, the alert, and the CLI and API that replay it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time

import pytest

from daemon.app import jobs
from daemon.domain import campaigns
from daemon.domain import events
from daemon.domain.alerts import active_alerts
from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.status import format_status
from daemon.store.models import InboundEvent
from daemon.store.models import Interaction
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import utcnow
from daemon.supervision import status
from tests.helpers import run_cli
from tests.integration.test_api import TOKEN
from tests.integration.test_api import Api
from tests.send_helpers import member_counts
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(120)

MAX_ATTEMPTS = 3
NUL_BODY = "oui\u0000 merci"
SURROGATE_BODY = "oui \ud800 merci"


def wassenger_reply(msg_id: str, phone: str, body: str) -> dict:
    now = int(time.time())
    return {
        "id": msg_id,
        "object": "message",
        "event": "message:in:new",
        "created": now,
        "data": {
            "id": msg_id,
            "flow": "inbound",
            "fromNumber": phone,
            "body": body,
            "timestamp": now,
        },
    }


def wassenger_ack(msg_id: str, reference: str) -> dict:
    return {
        "id": msg_id,
        "object": "message",
        "event": "message:out:ack",
        "created": int(time.time()),
        "data": {"id": msg_id, "ack": "delivered", "reference": reference},
    }


class Env:
    """The web role (admin API + webhooks) and a worker's Tasks, one database."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.api = Api(cfg)
        # The web role's Tasks; its provider (made on first use from the
        # config) is the fake one.
        self.tasks = self.api.tasks

    def post(self, payload: dict) -> dict:
        # ensure_ascii: NUL and lone surrogates travel as \u escapes, as
        # providers send them.
        raw = json.dumps(payload, ensure_ascii=True).encode()
        resp = self.api.call(
            "POST",
            "/webhooks/wassenger",
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 200, resp.text
        # The enqueue follows the answer, in another thread.
        assert self.api.app.wait_enqueued()
        return resp.json()

    def run_default_queue(self) -> int:
        """What worker:default does: execute every queued task."""
        huey = self.api.queues.default
        ran = 0
        while (task := huey.dequeue()) is not None:
            huey.execute(task)
            ran += 1
        return ran

    def event(self, msg_id: str) -> InboundEvent:
        return InboundEvent.get(InboundEvent.dedupe_key.contains(f":{msg_id}:"))

    def close(self) -> None:
        self.tasks.provider.close()
        self.api.close()


@pytest.fixture(params=["sqlite", "cluster"])
def env(request, make_config, fake):
    extra = {
        "web": {"api_token": TOKEN, "event_max_attempts": MAX_ATTEMPTS},
        "provider": {"base_url": fake.url},
        "retry": {"max_attempts": 1},
    }
    cfg = mode_config(request, make_config, request.param, extra)
    built = Env(cfg)
    yield built
    built.close()


def started_campaign(env: Env, count: int):
    """A running campaign whose Message 1s were all sent; (campaign, phones)."""
    campaign = new_campaign(seed_contacts(count))
    campaigns.start_campaign(campaign.id, env.tasks)
    env.tasks.fan_out(campaign.id)
    message1 = Message.select().where(Message.campaign == campaign.id)
    # A list first: on SQLite a cursor walking an index on status would meet
    # each row again once its send moved it.
    for message in list(message1):
        assert env.tasks.deliver(message.id) == "sent"
    env.run_default_queue()
    phones = [m.phone for m in message1.order_by(Message.id)]
    assert member_counts(campaign.id) == {MemberState.MESSAGE_1_SENT: count}
    return campaign, phones


def without_cleaning(monkeypatch):
    """The parser as it was before the fix: text passed on as received."""
    monkeypatch.setattr("daemon.providers.wassenger.clean_event", lambda e: e)


def failing_find_message(monkeypatch, reference: str):
    """A bug in status handling that one well-formed event trips every time."""
    real = campaigns.find_message

    def find(ref=None, provider_id=None, wa_id=None):
        if ref == reference:
            raise RuntimeError(f"cannot handle reference {ref}")
        return real(ref, provider_id, wa_id)

    monkeypatch.setattr(campaigns, "find_message", find)


def dead_metric(env: Env) -> float | None:
    text = env.api.http.get(env.api.url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("campaignd_webhook_events_dead "):
            return float(line.split()[1])
    return None


# ---------------------------------------------------------------- cleaning


def test_replies_with_nul_or_lone_surrogate_are_cleaned_and_processed(env):
    campaign, phones = started_campaign(env, 2)
    env.post(wassenger_reply("NUL1", phones[0], NUL_BODY))
    env.post(wassenger_reply("SUR1", phones[1], SURROGATE_BODY))
    # The raw payload is kept as received (ASCII-escaped JSON).
    assert "\\u0000" in env.event("NUL1").payload
    assert "\\ud800" in env.event("SUR1").payload

    assert env.run_default_queue() >= 1
    for msg_id in ("NUL1", "SUR1"):
        event = env.event(msg_id)
        assert event.processed_at is not None, event.last_error
        assert event.result == "reply: message_2_queued"
        assert event.dead_at is None and event.last_error is None
    bodies = sorted(i.body for i in Interaction.select())
    assert bodies == ["oui merci", "oui \ufffd merci"]
    assert member_counts(campaign.id) == {MemberState.INTERACTED: 2}
    assert events.dead_count() == 0


# ---------------------------------------------------------------- dead letters


@pytest.mark.slow
def test_a_poison_event_dies_and_no_longer_blocks_expiry_or_completion(
    env, monkeypatch
):
    campaign, phones = started_campaign(env, 3)
    without_cleaning(monkeypatch)
    # Fails to store on SQLite (surrogate) and on PostgreSQL (NUL).
    env.post(wassenger_reply("POISON", phones[2], NUL_BODY + "\ud800"))
    env.post(wassenger_reply("GOOD", phones[0], "oui"))
    env.run_default_queue()
    poison = env.event("POISON")
    assert poison.processed_at is None and poison.dead_at is None
    assert poison.attempts == 1 and poison.last_error
    assert env.event("GOOD").processed_at is not None

    # While it is merely pending, it holds expiry back (the reply came in time).
    later = utcnow() + dt.timedelta(hours=25)
    assert campaigns.expire_interactions(24, now=later) == 0

    # The sweeper replays it until it is dead, then leaves it alone.
    sweeps = []
    for _ in range(MAX_ATTEMPTS + 2):
        sweeps.append(env.tasks.sweep_once(now=later)["events"])
        env.run_default_queue()
    assert sweeps == [1] * (MAX_ATTEMPTS - 1) + [0, 0, 0]
    poison = env.event("POISON")
    assert poison.attempts == MAX_ATTEMPTS
    assert poison.dead_at is not None and poison.processed_at is None
    assert "Error" in poison.last_error
    assert events.dead_count() == 1
    assert {a["key"] for a in active_alerts()} == {events.ALERT_KEY}

    # Expiry and completion go on: the poison's sender and the silent
    # contact expire, the one who replied gets Message 2.
    assert campaigns.expire_interactions(24, now=later) == 2
    message2 = Message.get(Message.campaign == campaign.id, Message.kind == 2)
    assert env.tasks.deliver(message2.id) == "sent"
    assert member_counts(campaign.id) == {
        MemberState.EXPIRED: 2,
        MemberState.MESSAGE_2_SENT: 1,
    }
    assert campaigns.get_campaign(campaign.id).status == "completed"


def test_dead_letters_are_visible_and_replayed_through_the_api(env, monkeypatch):
    _, phones = started_campaign(env, 1)
    reference = Message.get().idempotency_key
    failing_find_message(monkeypatch, "cd-poison")
    env.post(wassenger_ack("ACK-BAD", "cd-poison"))
    env.post(wassenger_ack("ACK-OK", reference))
    env.run_default_queue()
    assert env.event("ACK-OK").result == "status delivered: applied"
    bad = env.event("ACK-BAD")
    for attempt in range(2, MAX_ATTEMPTS + 1):
        outcome = env.tasks.process_event(bad.id)
        assert outcome.startswith(
            "dead letter" if attempt == MAX_ATTEMPTS else "failed (attempt"
        ), outcome
    # A dead letter still queued somewhere is not processed again.
    assert env.tasks.process_event(bad.id).startswith("dead letter: not processed")
    assert env.event("ACK-BAD").attempts == MAX_ATTEMPTS

    listed = env.api.call("GET", "/api/v1/events?dead=true")
    assert listed.status_code == 200
    body = listed.json()
    assert body["dead_letters"] == 1
    assert [e["id"] for e in body["events"]] == [bad.id]
    entry = body["events"][0]
    assert entry["state"] == "dead" and entry["attempts"] == MAX_ATTEMPTS
    assert "RuntimeError: cannot handle reference cd-poison" in entry["last_error"]
    every = env.api.call("GET", "/api/v1/events").json()["events"]
    assert {e["state"] for e in every} == {"processed", "dead"}
    assert dead_metric(env) == 1.0
    answer = status.FigureGatherer(env.cfg).gather()
    assert answer["dead_letters"] == 1
    assert "webhook dead letters: 1" in format_status(answer)
    assert jobs.run("system_health_check", env.tasks, utcnow()).endswith(
        "; 1 dead letters"
    )
    assert {a["key"] for a in active_alerts()} == {events.ALERT_KEY}

    # Unknown id, and an event that is not a dead letter: one JSON reason.
    missing = env.api.call(
        "POST", "/api/v1/events/999999/replay", "/api/v1/events/{event_id}/replay"
    )
    assert missing.status_code == 404
    assert "999999 does not exist" in missing.json()["description"]
    ok_id = env.event("ACK-OK").id
    processed = env.api.call(
        "POST", f"/api/v1/events/{ok_id}/replay", "/api/v1/events/{event_id}/replay"
    )
    assert processed.status_code == 409
    assert "already processed" in processed.json()["description"]

    # The bug is fixed: replay, and the event is processed.
    monkeypatch.undo()
    replayed = env.api.call(
        "POST", f"/api/v1/events/{bad.id}/replay", "/api/v1/events/{event_id}/replay"
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["state"] == "pending"
    assert replayed.json()["attempts"] == 0
    assert events.dead_count() == 0
    assert active_alerts() == []
    assert env.run_default_queue() == 1
    done = env.event("ACK-BAD")
    assert done.processed_at is not None and done.dead_at is None
    assert done.result == "status: unknown message"
    assert dead_metric(env) == 0.0
    assert "webhook dead letters: 0" in format_status(
        status.FigureGatherer(env.cfg).gather()
    )
    again = env.api.call(
        "POST", f"/api/v1/events/{bad.id}/replay", "/api/v1/events/{event_id}/replay"
    )
    assert again.status_code == 409


def test_a_failing_replay_dies_again_and_the_health_check_resolves_the_alert(
    env, monkeypatch
):
    failing_find_message(monkeypatch, "cd-poison")
    env.post(wassenger_ack("ACK-BAD", "cd-poison"))
    bad = env.event("ACK-BAD")
    assert env.run_default_queue() == 1
    for _ in range(MAX_ATTEMPTS - 1):
        env.tasks.process_event(bad.id)
    assert env.event("ACK-BAD").dead_at is not None
    events.replay(bad.id, env.tasks, env.cfg)
    assert active_alerts() == []
    # Still broken: it dies again after a full set of attempts.
    assert env.run_default_queue() == 1
    for _ in range(MAX_ATTEMPTS - 1):
        assert env.event("ACK-BAD").dead_at is None
        env.tasks.process_event(bad.id)
    assert env.event("ACK-BAD").dead_at is not None
    assert {a["key"] for a in active_alerts()} == {events.ALERT_KEY}
    # An operator deletes it by hand: the health check resolves the alert.
    InboundEvent.delete().where(InboundEvent.id == bad.id).execute()
    assert jobs.run("system_health_check", env.tasks, utcnow()) == "ok"
    assert active_alerts() == []


# ---------------------------------------------------------------- the CLI


def campaignd(cfg, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, cfg=cfg)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == EXIT_FAILURE, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_lists_and_replays_dead_letters(make_config, fake, monkeypatch):
    cfg = make_config(
        "sqlite",
        {
            "web": {"api_token": TOKEN, "event_max_attempts": MAX_ATTEMPTS},
            "provider": {"base_url": fake.url},
        },
    )
    env = Env(cfg)
    try:
        failing_find_message(monkeypatch, "cd-poison")
        env.post(wassenger_ack("ACK-BAD", "cd-poison"))
        env.post(wassenger_ack("ACK-OK", "cd-unknown"))
        env.run_default_queue()
        bad = env.event("ACK-BAD")
        for _ in range(MAX_ATTEMPTS - 1):
            env.tasks.process_event(bad.id)
        ok_id = env.event("ACK-OK").id

        listed = campaignd(cfg, "events", "list", "--dead")
        assert listed.returncode == EXIT_OK, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:6] == [
            "ID",
            "PROVIDER",
            "TYPE",
            "RECEIVED",
            "STATE",
            "ATTEMPTS",
        ]
        assert len(lines) == 2
        fields = lines[1].split()
        assert fields[:3] == [str(bad.id), "wassenger", "message:out:ack"]
        assert fields[4:6] == ["dead", str(MAX_ATTEMPTS)]
        assert "RuntimeError: cannot handle reference cd-poison" in lines[1]
        every = campaignd(cfg, "events", "list", "--limit", "1", "--json")
        assert [e["id"] for e in json.loads(every.stdout)["events"]] == [ok_id]

        assert "does not exist" in one_error_line(
            campaignd(cfg, "events", "replay", "424242")
        )
        assert "already processed" in one_error_line(
            campaignd(cfg, "events", "replay", str(ok_id))
        )

        monkeypatch.undo()
        replayed = campaignd(cfg, "events", "replay", str(bad.id))
        assert replayed.returncode == EXIT_OK, replayed.stderr
        assert replayed.stdout.splitlines() == [
            f"webhook event {bad.id} (wassenger message:out:ack) replayed: "
            "queued for processing"
        ]
        assert env.run_default_queue() == 1
        assert env.event("ACK-BAD").processed_at is not None
        empty = campaignd(cfg, "events", "list", "--dead")
        assert empty.stdout.strip() == "no dead letters"
    finally:
        env.close()
