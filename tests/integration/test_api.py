"""The admin API over real HTTP, every response checked against /api/v1/openapi.json."""

from __future__ import annotations

import jsonschema_rs
import pytest
import requests

from daemon.app.tasks import Tasks
from daemon.domain import campaigns
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.store.db import open_database
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.send_helpers import mode_config

pytestmark = pytest.mark.timeout(90)

TOKEN = "admin-token"


class Api:
    """A client that validates every answer against the served OpenAPI document."""

    def __init__(self, cfg):
        open_database(cfg, migrate_schema=True)
        database.close()
        self.queues = make_queues(cfg)
        self.tasks = Tasks(cfg, self.queues)
        self.app = create_app(cfg, self.tasks)
        self.server = WebServer(self.app, cfg, port=0)
        self.thread = self.server.serve_in_thread()
        self.url = self.server.url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {TOKEN}"
        self.spec = self.http.get(self.url + "/api/v1/openapi.json", timeout=10).json()
        self.checked = 0

    def call(self, method: str, path: str, template: str | None = None, **kw):
        resp = self.http.request(method, self.url + path, timeout=30, **kw)
        self.check(method.lower(), template or path.split("?")[0], resp)
        return resp

    def check(self, method: str, template: str, resp: requests.Response) -> None:
        operation = self.spec["paths"][template][method]
        documented = operation["responses"]
        status = str(resp.status_code)
        assert status in documented, f"{method} {template}: {status} not documented"
        content = documented[status].get("content", {})
        media = resp.headers["Content-Type"].split(";")[0]
        assert media in content, f"{method} {template} {status}: {media} undocumented"
        if media == "application/json":
            schema = {**content[media]["schema"], "components": self.spec["components"]}
            jsonschema_rs.Draft202012Validator(schema).validate(resp.json())
        self.checked += 1

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.thread.join(10)
        self.queues.close()
        database.close()


@pytest.fixture(params=["sqlite", "cluster"])
def api(request, make_config):
    extra = {"web": {"api_token": TOKEN}}
    cfg = mode_config(request, make_config, request.param, extra)
    client = Api(cfg)
    yield client
    client.close()


CAMPAIGN = "/api/v1/campaigns/{campaign_id}"


def test_campaign_lifecycle(api):
    imported = api.call(
        "POST",
        "/api/v1/contacts/import",
        json={
            "contacts": [
                {"phone": "06 12 34 56 01", "name": "Ann", "city": "Lyon"},
                {"phone": "+33612345602", "name": "Bob", "city": "Nice"},
                {"phone": "+33612345601", "city": "Paris"},  # merged into Ann
            ]
        },
    )
    assert imported.status_code == 200
    report = imported.json()
    assert (report["created"], report["duplicates_merged"]) == (2, 1)
    ids = sorted(set(report["contact_ids"]))

    created = api.call(
        "POST",
        "/api/v1/campaigns",
        json={
            "name": "Spring",
            "message1": "Bonjour {name} de {city}",
            "message2": "Merci {name}",
            "contacts": "telephone;name;city\n+33612345603;Cid;Brest\n",
            "contact_ids": ids,
        },
    )
    assert created.status_code == 201, created.text
    campaign = created.json()
    cid = campaign["id"]
    assert created.headers["Location"].endswith(f"/api/v1/campaigns/{cid}")
    assert (campaign["status"], campaign["contacts"]) == ("draft", 3)
    assert campaign["import"]["created"] == 1

    listed = api.call("GET", "/api/v1/campaigns").json()["campaigns"]
    assert [(c["id"], c["contacts"]) for c in listed] == [(cid, 3)]

    path = f"/api/v1/campaigns/{cid}"
    started = api.call("POST", path + "/start", CAMPAIGN + "/start")
    assert started.json()["status"] == "running"
    again = api.call("POST", path + "/start", CAMPAIGN + "/start")
    assert again.status_code == 409
    assert "running" in again.json()["description"]
    assert api.queues.messages.pending_count() == 1  # the fan-out task

    paused = api.call(
        "POST", path + "/pause", CAMPAIGN + "/pause", json={"reason": "lunch"}
    )
    assert (paused.json()["status"], paused.json()["status_reason"]) == (
        "paused",
        "lunch",
    )
    resumed = api.call("POST", path + "/resume", CAMPAIGN + "/resume")
    assert resumed.json()["status"] == "running"
    retried = api.call("POST", path + "/retry-failed", CAMPAIGN + "/retry-failed")
    assert retried.json()["retried"] == 0
    cancelled = api.call("POST", path + "/cancel", CAMPAIGN + "/cancel")
    assert cancelled.json()["status"] == "cancelled"
    got = api.call("GET", path, CAMPAIGN)
    assert got.json()["status"] == "cancelled"
    assert api.call("GET", "/api/v1/campaigns/999", CAMPAIGN).status_code == 404
    bad = api.call("POST", path + "/pause", CAMPAIGN + "/pause", json={"why": "x"})
    assert bad.status_code == 400
    assert api.checked >= 12


def test_campaign_refused_when_a_contact_lacks_a_variable_imports_nothing(api):
    resp = api.call(
        "POST",
        "/api/v1/campaigns",
        json={
            "name": "Needs city",
            "message1": "Hi {name} from {city}",
            "message2": "Thanks",
            "contacts": [{"phone": "+33612345611", "name": "NoCity"}],
        },
    )
    assert resp.status_code == 400
    assert "{city}" in resp.json()["description"]
    missing = api.call(
        "GET", "/api/v1/contacts/%2B33612345611", "/api/v1/contacts/{ref}"
    )
    assert missing.status_code == 404  # rolled back with the campaign


def test_messages_paging_and_filters(api):
    people = [{"phone": f"+336123456{i:02d}", "name": f"P{i}"} for i in range(1, 8)]
    created = api.call(
        "POST",
        "/api/v1/campaigns",
        json={
            "name": "Paged",
            "message1": "Hi {name}",
            "message2": "M2",
            "contacts": people,
            "start": True,
        },
    )
    assert created.status_code == 201
    cid = created.json()["id"]
    with database.connection_context():
        campaigns.fan_out(cid)  # what the fan-out task does in a worker
        first = Message.select().order_by(Message.id).first()
        Message.update(status=MessageStatus.FAILED).where(
            Message.id == first.id
        ).execute()

    seen, cursor = [], None
    while True:
        query = f"campaign_id={cid}&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = api.call("GET", f"/api/v1/messages?{query}").json()
        seen += [m["id"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 and seen == sorted(seen)
    by_offset = api.call("GET", f"/api/v1/messages?campaign_id={cid}&offset=5").json()
    assert [m["id"] for m in by_offset["messages"]] == seen[5:]
    failed = api.call("GET", "/api/v1/messages?status=failed&kind=1").json()
    assert [m["id"] for m in failed["messages"]] == [seen[0]]
    assert api.call("GET", "/api/v1/messages?kind=2").json()["messages"] == []

    retried = api.call(
        "POST", f"/api/v1/campaigns/{cid}/retry-failed", CAMPAIGN + "/retry-failed"
    )
    assert retried.json()["retried"] == 1


def test_contact_opt_out(api):
    api.call(
        "POST",
        "/api/v1/contacts/import",
        data="phone,name\n+33612345699,Zoe\n",
        headers={"Content-Type": "text/csv"},
    )
    ref = "/api/v1/contacts/%2B33612345699"
    template = "/api/v1/contacts/{ref}/opt-out"
    out = api.call("POST", ref + "/opt-out", template, json={"reason": "asked"})
    assert out.status_code == 200
    assert out.json()["opted_out"] is True
    contact = api.call("GET", ref, "/api/v1/contacts/{ref}").json()
    assert contact["opted_out_at"] is not None
    missing = api.call("POST", "/api/v1/contacts/12345/opt-out", template)
    assert missing.status_code == 404


def test_auth_answers_are_documented(api):
    api.http.headers["Authorization"] = "Bearer wrong"
    resp = api.call("GET", "/api/v1/campaigns")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
