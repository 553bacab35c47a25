"""The web console (/ui) in process: its guards, its forms, its figures.

falcon's TestClient on the real app (create_app) and a real database, on
SQLite and on PostgreSQL + Redis. The browser test (tests/e2e/test_console.py)
drives the same pages on a running daemon.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from falcon import testing

from daemon.app.tasks import Tasks
from daemon.domain import insights
from daemon.roles.web.app import create_app
from daemon.roles.web.console import SESSION_MAX_AGE_S
from daemon.roles.web.console import Sessions
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(90)

TOKEN = "console-token"
CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


class Console:
    def __init__(self, cfg):
        open_database(cfg, migrate_schema=True)
        self.queues = make_queues(cfg)
        self.tasks = Tasks(cfg, self.queues)
        self.client = testing.TestClient(create_app(cfg, self.tasks))
        self.cookie = ""

    def login(self, token: str = TOKEN, **headers):
        resp = self.client.simulate_post(
            "/ui/login",
            body=f"token={token}&next=/ui/events",
            headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        )
        if resp.status_code == 303:
            self.cookie = resp.cookies["campaignd_console"].value
        return resp

    def get(self, path: str):
        return self.client.simulate_get(
            path, headers={"Cookie": f"campaignd_console={self.cookie}"}
        )

    def post(self, path: str, form: str = ""):
        return self.client.simulate_post(
            path,
            body=form,
            headers={
                "Cookie": f"campaignd_console={self.cookie}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )

    def close(self):
        self.queues.close()
        database.close()


@pytest.fixture(params=["sqlite", "cluster"])
def console(request, make_config):
    extra = {"web": {"api_token": TOKEN}}
    cfg = mode_config(request, make_config, request.param, extra)
    built = Console(cfg)
    yield built
    built.close()


def test_without_a_token_every_page_refuses_and_says_why(make_config):
    built = Console(make_config("sqlite"))
    try:
        for resp in (
            built.client.simulate_get("/ui"),
            built.client.simulate_get("/ui/login"),
            built.login(""),
            built.post("/ui/events/1/replay", "csrf=x"),
        ):
            assert resp.status_code == 403
            assert resp.headers["content-type"].startswith("text/html")
            assert "web.api_token" in resp.text
    finally:
        built.close()


def test_login_sets_a_strict_http_only_cookie_that_holds_no_secret(console):
    resp = console.client.simulate_get("/ui/campaigns?x=1")
    assert resp.status_code == 303
    assert resp.headers["location"] == "/ui/login?next=/ui/campaigns%3Fx%3D1"

    wrong = console.login("nope")
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert "set-cookie" not in wrong.headers

    resp = console.login()
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/events"
    header = resp.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/ui"):
        assert attribute in header
    assert "Secure" not in header  # plain http: the browser would drop it
    assert TOKEN not in console.cookie
    assert console.get("/ui/events").status_code == 200
    # Behind a TLS proxy the cookie is Secure.
    assert (
        "Secure"
        in console.login(**{"X-Forwarded-Proto": "https"}).headers["set-cookie"]
    )


def test_login_answers_429_after_ten_wrong_tokens(console):
    for _ in range(10):
        assert console.login("nope").status_code == 401
    # Past the limit the right token is not even compared.
    for token in ("nope", TOKEN):
        resp = console.login(token)
        assert resp.status_code == 429
        assert "too many wrong tokens: try again in" in resp.text
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        assert "set-cookie" not in resp.headers
    # The admin API shares the count: same address, same wait.
    api = console.client.simulate_get(
        "/api/v1/campaigns", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert api.status_code == 429


def test_forged_or_expired_sessions_and_foreign_redirects_are_refused(console):
    now = [1_000_000.0]
    sessions = Sessions(TOKEN, clock=lambda: now[0])
    value = sessions.new()
    assert sessions.valid(value)
    now[0] += SESSION_MAX_AGE_S + 1
    assert not sessions.valid(value)
    assert not Sessions("other-token").valid(Sessions(TOKEN).new())

    console.cookie = "1700000000.forged"
    assert console.get("/ui").status_code == 303
    resp = console.client.simulate_post(
        "/ui/login",
        body=f"token={TOKEN}&next=//evil.example/ui",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.headers["location"] == "/ui"
    resp = console.client.simulate_post(
        "/ui/login",
        body=f"token={TOKEN}&next=/ui%0d%0aSet-Cookie:%20x=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.headers["location"] == "/ui"


def test_replay_needs_the_csrf_token_and_names_what_is_wrong(console):
    console.login()
    page = console.get("/ui/events")
    csrf = CSRF.search(page.text).group(1)
    assert console.post("/ui/events/1/replay").status_code == 403
    assert console.post("/ui/events/1/replay", "csrf=0000").status_code == 403

    missing = console.post("/ui/events/999/replay", f"csrf={csrf}")
    assert missing.status_code == 404
    assert "webhook event 999 does not exist" in missing.text
    event = InboundEvent.create(
        provider="wassenger", dedupe_key="k:1:", event_type="t", payload="{}"
    )
    pending = console.post(f"/ui/events/{event.id}/replay", f"csrf={csrf}")
    assert pending.status_code == 409 and "not a dead letter" in pending.text

    InboundEvent.update(dead_at=dt.datetime(2026, 1, 1), attempts=5).execute()
    done = console.post(f"/ui/events/{event.id}/replay", f"csrf={csrf}")
    assert done.status_code == 303
    assert done.headers["location"] == f"/ui/events?replayed={event.id}"
    event = InboundEvent.get_by_id(event.id)
    assert event.dead_at is None and event.attempts == 0
    assert console.queues.default.pending_count() == 1  # its processing queued

    # Log out needs the token too; then the cookie is cleared.
    assert console.post("/ui/logout").status_code == 403
    out = console.post("/ui/logout", f"csrf={csrf}")
    assert out.status_code == 303
    assert out.headers["set-cookie"].startswith('campaignd_console=""; expires=')


def test_log_out_ends_the_session_for_every_copy_of_its_cookie(console):
    console.login()
    copied = console.cookie
    csrf = CSRF.search(console.get("/ui/events").text).group(1)
    # A second browser with its own session, which must stay logged in.
    other = Console.__new__(Console)
    other.client, other.cookie = console.client, ""
    other.login()
    assert other.cookie not in ("", copied)  # a session of its own, same second

    out = console.post("/ui/logout", f"csrf={csrf}")
    assert out.status_code == 303
    console.cookie = copied  # the copy kept (another tab, a stolen cookie)
    page = console.get("/ui/events")
    assert page.status_code == 303
    assert page.headers["location"].startswith("/ui/login")
    refused = console.post("/ui/logout", f"csrf={csrf}")
    assert refused.status_code == 401 and "Not logged in" in refused.text
    assert other.get("/ui/events").status_code == 200
    # Logging in again gives a new session, which works.
    console.login()
    assert console.get("/ui/events").status_code == 200


def test_the_overview_says_when_the_supervisor_does_not_answer(console):
    console.login()
    resp = console.get("/ui")
    assert resp.status_code == 200
    assert "The supervisor does not answer" in resp.text
    assert 'data-figure="queue-messages">0<' in resp.text  # our own queues


def test_sends_per_minute_buckets_and_the_funnel(console):
    campaign = new_campaign(seed_contacts(6))
    start = dt.datetime(2026, 3, 1, 10, 0, 7)
    campaign.started_at = start
    campaign.finished_at = start + dt.timedelta(minutes=30)
    campaign.status = "completed"
    campaign.save()
    # Message 1 at 0, 0, 1, 29 minutes, a Message 2 at 1 minute, one failure.
    members = list(campaign.members)
    plan = [(1, 0, "read"), (1, 0, "sent"), (1, 1, "delivered"), (1, 29, "sent")]
    plan += [(2, 1, "sent"), (1, None, "failed")]
    for member, (kind, minute, status) in zip(members, plan, strict=False):
        Message.create(
            campaign=campaign.id,
            contact=member.contact_id,
            kind=kind,
            phone="+33600000000",
            body="x",
            status=status,
            idempotency_key=f"k-{member.id}-{kind}",
            sent_at=None if minute is None else start + dt.timedelta(minutes=minute),
            error="send: HTTP 400: not on WhatsApp" if minute is None else None,
            failed_at=start if minute is None else None,
        )
    series = insights.sends_over_time(campaign.id)
    assert series.bucket_s == 60 and series.start == dt.datetime(2026, 3, 1, 10, 0)
    assert series.message1[:2] == [2, 1] and series.message1[29] == 1
    assert series.message2[:2] == [0, 1] and series.total == 5

    console.login()
    page = console.get(f"/ui/campaigns/{campaign.id}").text
    assert 'data-figure="sends-total">5<' in page
    assert 'data-figure="targeted">6<' in page
    assert 'data-figure="sent">4<' in page
    assert 'data-figure="delivered">2<' in page
    assert "send: HTTP 400: not on WhatsApp" in page
    # The campaign is completed: its ETA line says when it finished.
    eta = page.split('data-figure="eta">')[1].split("<")[0]
    assert eta.startswith("completed at 2026-03-01 10:30:"), eta
    assert console.get("/ui/campaigns/999").status_code == 404
    listing = console.get("/ui/campaigns").text
    assert f'data-figure="contacts-{campaign.id}">6<' in listing
