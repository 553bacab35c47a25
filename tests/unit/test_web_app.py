"""The web app in process (falcon TestClient) on a real SQLite database."""

from __future__ import annotations

import json
from pathlib import Path

import falcon
import pytest
from falcon import testing

from daemon.app.tasks import Tasks
from daemon.providers.base import sign_hmac_sha256
from daemon.roles.web import MAX_JSON_DEPTH
from daemon.roles.web.app import create_app
from daemon.roles.web.openapi import build_spec
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "providers"
TOKEN = "api-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def inbound(msg_id: str, phone: str = "+33612345678", body: str = "oui") -> dict:
    return {
        "id": msg_id,
        "object": "message",
        "event": "message:in:new",
        "data": {
            "id": msg_id,
            "flow": "inbound",
            "fromNumber": phone,
            "body": body,
            "timestamp": 1765642500,
        },
    }


class RecordingTasks:
    """Stand-in for daemon.app.tasks.Tasks: records what would be enqueued."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.events: list[int] = []

    def enqueue_event_chunks(self, chunks: list[list[int]]) -> None:
        if self.fail:
            raise ConnectionError("queue backend down")
        self.events.extend(i for chunk in chunks for i in chunk)


@pytest.fixture
def build(make_config):
    """build(extra_config, tasks=None) -> (TestClient, tasks)."""
    opened = []

    def make(extra: dict | None = None, tasks=None):
        cfg = make_config("sqlite", extra or {})
        open_database(cfg, migrate_schema=True)
        database.close()
        queues = make_queues(cfg)
        tasks = tasks if tasks is not None else RecordingTasks()
        opened.append(queues)
        return testing.TestClient(create_app(cfg, tasks, queues=queues)), tasks

    yield make
    for queues in opened:
        queues.close()


def stored_events() -> list[InboundEvent]:
    with database.connection_context():
        return list(InboundEvent.select().order_by(InboundEvent.id))


# --- webhooks: persist, then acknowledge ------------------------------------------


def test_wassenger_event_is_stored_then_enqueued_once(build):
    client, tasks = build()
    body = fixture("wassenger_message_in_new.json")
    first = client.simulate_post("/webhooks/wassenger", json=body)
    again = client.simulate_post("/webhooks/wassenger", json=body)
    assert first.status_code == 200 and first.json == {"stored": 1, "duplicates": 0}
    assert again.status_code == 200 and again.json == {"stored": 0, "duplicates": 1}
    events = stored_events()
    assert len(events) == 1
    assert events[0].provider == "wassenger"
    assert events[0].event_type == "message:in:new"
    assert json.loads(events[0].payload) == body
    assert client.app.wait_enqueued()  # the enqueue follows, in another thread
    assert tasks.events == [events[0].id]


def test_a_whole_body_is_stored_as_received_and_a_part_of_one_escaped(build):
    client, _ = build()
    body = inbound("R1", body="caf\u00e9 \U0001f600")  # an accent, an emoji
    # Pretty-printed, raw UTF-8, a lone surrogate and a NUL as JSON escapes.
    raw = json.dumps(body, indent=2, ensure_ascii=False).replace(
        '"flow"', '"odd": "\\ud83d \\u0000",\n  "flow"'
    )
    assert "\\u0000" in raw
    resp = client.simulate_post("/webhooks/wassenger", body=raw.encode())
    assert resp.status_code == 200 and resp.json["stored"] == 1
    [event] = stored_events()
    assert event.payload == raw
    assert json.loads(event.payload)["data"]["body"] == "caf\u00e9 \U0001f600"

    meta = fixture("meta_message_text.json")
    message = meta["entry"][0]["changes"][0]["value"]["messages"][0]
    message["text"]["body"] = "caf\u00e9"
    resp = client.simulate_post(
        "/webhooks/whatsapp", body=json.dumps(meta, ensure_ascii=False).encode()
    )
    assert resp.status_code == 200 and resp.json["stored"] == 1
    item = stored_events()[1].payload
    assert item.isascii() and json.loads(item)["message"]["text"]["body"] == "caf\u00e9"


def test_real_tasks_enqueue_on_the_default_queue(build, make_config):
    cfg = make_config("sqlite")
    queues = make_queues(cfg)
    client, _ = build(tasks=Tasks(cfg, queues))
    resp = client.simulate_post("/webhooks/wassenger", json=inbound("A1"))
    assert resp.status_code == 200
    assert client.app.wait_enqueued()  # the enqueue follows, in another thread
    assert queues.default.pending_count() == 1
    queues.close()


def test_enqueue_failure_after_commit_still_acknowledges(build):
    client, _ = build(tasks=RecordingTasks(fail=True))
    resp = client.simulate_post("/webhooks/wassenger", json=inbound("B1"))
    assert resp.status_code == 200 and resp.json["stored"] == 1
    [event] = stored_events()
    assert event.processed_at is None  # left for the sweeper to replay


def test_meta_batch_is_split_into_items(build):
    client, tasks = build()
    body = fixture("meta_status_delivered.json")
    statuses = body["entry"][0]["changes"][0]["value"]["statuses"]
    statuses.append(dict(statuses[0], status="read"))
    resp = client.simulate_post("/webhooks/whatsapp", json=body)
    assert resp.status_code == 200 and resp.json == {"stored": 2, "duplicates": 0}
    assert sorted(e.event_type for e in stored_events()) == [
        "status:delivered",
        "status:read",
    ]
    assert client.app.wait_enqueued()  # the enqueue follows, in another thread
    assert len(tasks.events) == 2


def test_unicode_and_nul_in_payloads_are_stored(build):
    client, _ = build()
    body = inbound("C1", body="caf\u00e9 \x00 \ud83d")  # NUL and a lone surrogate
    raw = json.dumps(body).encode()
    resp = client.simulate_post(
        "/webhooks/wassenger", body=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 200
    assert (
        json.loads(stored_events()[0].payload)["data"]["body"] == body["data"]["body"]
    )


# --- webhooks: authentication ------------------------------------------------------


def test_wassenger_shared_secret(build):
    client, _ = build({"web": {"webhook_secret": "s3cret"}})
    body = inbound("D1")
    assert client.simulate_post("/webhooks/wassenger", json=body).status_code == 401
    wrong = {"X-Webhook-Secret": "nope"}
    assert (
        client.simulate_post("/webhooks/wassenger", json=body, headers=wrong)
    ).status_code == 401
    ok = {"X-Webhook-Secret": "s3cret"}
    assert (
        client.simulate_post("/webhooks/wassenger", json=body, headers=ok)
    ).status_code == 200
    by_query = client.simulate_post(
        "/webhooks/wassenger", json=inbound("D2"), params={"token": "s3cret"}
    )
    assert by_query.status_code == 200
    assert len(stored_events()) == 2


def test_wassenger_hmac_signature(build):
    client, _ = build({"web": {"webhook_hmac_secret": "k"}})
    raw = json.dumps(inbound("E1")).encode()
    good = {"X-Wassenger-Signature": sign_hmac_sha256("k", raw)}
    for headers in ({}, {"X-Wassenger-Signature": sign_hmac_sha256("x", raw)}):
        resp = client.simulate_post("/webhooks/wassenger", body=raw, headers=headers)
        assert resp.status_code == 401
        assert resp.json["title"] == "Unauthorized"
    resp = client.simulate_post("/webhooks/wassenger", body=raw, headers=good)
    assert resp.status_code == 200
    # A valid signature over a body that is not an object is still a 400.
    raw = b"[1, 2]"
    headers = {"X-Wassenger-Signature": sign_hmac_sha256("k", raw)}
    resp = client.simulate_post("/webhooks/wassenger", body=raw, headers=headers)
    assert resp.status_code == 400


def test_meta_signature_over_the_raw_body(build):
    client, _ = build({"provider": {"app_secret": "appsecret"}})
    # Meta escapes non-ASCII; re-serialising would change the bytes.
    raw = json.dumps(fixture("meta_message_text.json"), ensure_ascii=True).encode()
    bad = {"X-Hub-Signature-256": sign_hmac_sha256("appsecret", raw + b" ")}
    good = {"X-Hub-Signature-256": sign_hmac_sha256("appsecret", raw)}
    assert client.simulate_post("/webhooks/whatsapp", body=raw).status_code == 401
    assert (
        client.simulate_post("/webhooks/whatsapp", body=raw, headers=bad)
    ).status_code == 401
    resp = client.simulate_post("/webhooks/whatsapp", body=raw, headers=good)
    assert resp.status_code == 200 and resp.json["stored"] == 1


def test_meta_handshake(build):
    client, _ = build({"provider": {"verify_token": "vt"}})
    params = {"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "42"}
    resp = client.simulate_get("/webhooks/whatsapp", params=params)
    assert resp.status_code == 200
    assert resp.text == "42"
    assert resp.headers["content-type"].startswith("text/plain")
    for wrong in ({"hub.verify_token": "no"}, {"hub.mode": "unsubscribe"}):
        resp = client.simulate_get("/webhooks/whatsapp", params={**params, **wrong})
        assert resp.status_code == 403


def test_meta_handshake_refused_without_a_configured_token(build):
    client, _ = build()
    params = {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}
    assert client.simulate_get("/webhooks/whatsapp", params=params).status_code == 403


# --- client mistakes are 4xx, in JSON ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        (b"", "Empty body"),
        (b"{not json", "Invalid JSON"),
        (b"\xff\xfe\x00{", "Invalid UTF-8"),
        (b'{"a": NaN}', "Invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "Invalid JSON"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "Invalid JSON"),
        (b"1" * 5000, "Invalid JSON"),  # above Python's int digit limit
        (b'"just a string"', "Invalid body"),
        (b"null", "Invalid body"),
    ],
)
def test_bad_bodies_are_400(build, raw, title):
    client, _ = build()
    for path in ("/webhooks/wassenger", "/webhooks/whatsapp"):
        resp = client.simulate_post(
            path, body=raw, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json["title"] == title
        assert resp.json["description"]
    assert stored_events() == []


def test_nesting_is_refused_from_one_level_past_the_limit(build):
    client, _ = build()

    def objects(depth: int, leaf: str) -> bytes:
        return b'{"a":' * depth + json.dumps(leaf).encode() + b"}" * depth

    for path in ("/webhooks/wassenger", "/webhooks/whatsapp"):
        # Many brackets, none deep: the depth is counted, not guessed from them.
        wide = {"event": "x", "path": path, "items": [{}] * 200, "ok": [[1]] * 50}
        for body in (objects(MAX_JSON_DEPTH, path), json.dumps(wide).encode()):
            resp = client.simulate_post(path, body=body)
            assert resp.status_code == 200, (path, resp.text)
            assert resp.json == {"stored": 1, "duplicates": 0}
        resp = client.simulate_post(path, body=objects(MAX_JSON_DEPTH + 1, path))
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json["description"] == (
            f"the body is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    assert len(stored_events()) == 4


def test_body_over_the_limit_is_413(build):
    client, _ = build({"web": {"max_body_bytes": 2048}})
    big = json.dumps(inbound("F1", body="x" * 4000)).encode()
    resp = client.simulate_post("/webhooks/wassenger", body=big)
    assert resp.status_code == 413
    assert resp.json["title"] == "Body too large"
    assert stored_events() == []


def test_errors_are_json_even_when_xml_is_preferred(build):
    client, _ = build()
    resp = client.simulate_post(
        "/webhooks/wassenger", body=b"{", headers={"Accept": "application/xml"}
    )
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/json")


def test_unknown_route_and_method(build):
    client, _ = build()
    assert client.simulate_get("/nope").status_code == 404
    resp = client.simulate_get("/webhooks/wassenger")
    assert resp.status_code == 405 and "POST" in resp.headers["allow"]


# --- admin API auth ----------------------------------------------------------------


def test_admin_api_disabled_without_a_token(build):
    client, _ = build()
    resp = client.simulate_get("/api/v1/campaigns", headers=AUTH)
    assert resp.status_code == 403
    assert resp.json["title"] == "Admin API disabled"


def test_admin_api_bearer_token(build):
    client, _ = build({"web": {"api_token": TOKEN}})
    assert client.simulate_get("/api/v1/campaigns").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.simulate_get("/api/v1/campaigns", headers=wrong).status_code == 401
    basic = {"Authorization": f"Basic {TOKEN}"}
    assert client.simulate_get("/api/v1/campaigns", headers=basic).status_code == 401
    resp = client.simulate_get("/api/v1/campaigns", headers=AUTH)
    assert resp.status_code == 200 and resp.json == {"campaigns": []}
    # The description of the API is public; it holds no secret.
    assert client.simulate_get("/api/v1/openapi.json").status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"name": "x", "message1": "a"}, "'message2' is required"),
        ({"name": 3, "message1": "a", "message2": "b"}, "must be a string"),
        ({"name": "x", "message1": "a", "message2": "b", "nme": 1}, "unknown field"),
        ({"name": "x", "message1": "a", "message2": "b"}, "needs 'contacts'"),
        (
            {"name": "x", "message1": "a", "message2": "b", "contacts": 7},
            "CSV text or a list",
        ),
        (
            {"name": "x", "message1": "a", "message2": "b", "contact_ids": ["1"]},
            "list of positive ids",
        ),
        (
            {"name": "x\x00", "message1": "a", "message2": "b"},
            "NUL",
        ),
    ],
)
def test_create_campaign_input_errors_name_the_field(build, body, fragment):
    client, _ = build({"web": {"api_token": TOKEN}})
    resp = client.simulate_post("/api/v1/campaigns", json=body, headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json["description"]


def test_campaign_with_no_valid_contact_lists_every_rejected_row(build):
    client, _ = build({"web": {"api_token": TOKEN}})
    body = {
        "name": "x",
        "message1": "a",
        "message2": "b",
        "contacts": [{"phone": "nope"}, {"name": "no phone"}],
    }
    resp = client.simulate_post("/api/v1/campaigns", json=body, headers=AUTH)
    assert resp.status_code == 400
    assert [e["line"] for e in resp.json["errors"]] == [0, 1]


def test_contact_reference_forms(build):
    client, _ = build({"web": {"api_token": TOKEN}})
    resp = client.simulate_post(
        "/api/v1/contacts/import",
        body="phone;name\n06 12 34 56 78;Ann\n",
        headers={**AUTH, "Content-Type": "text/csv"},
    )
    assert resp.status_code == 200 and resp.json["created"] == 1
    contact_id = resp.json["contact_ids"][0]
    by_id = client.simulate_get(f"/api/v1/contacts/{contact_id}", headers=AUTH)
    by_phone = client.simulate_get("/api/v1/contacts/%2B33612345678", headers=AUTH)
    assert by_id.json == by_phone.json
    assert by_id.json["name"] == "Ann"
    assert client.simulate_get("/api/v1/contacts/99", headers=AUTH).status_code == 404
    huge = client.simulate_get("/api/v1/contacts/" + "9" * 30, headers=AUTH)
    assert huge.status_code == 404
    assert client.simulate_get("/api/v1/contacts/ann", headers=AUTH).status_code == 400
    bad_phone = client.simulate_get("/api/v1/contacts/%2B1", headers=AUTH)
    assert bad_phone.status_code == 400


def test_message_list_parameters_are_validated(build):
    client, _ = build({"web": {"api_token": TOKEN}})
    for query in (
        "limit=0",
        "limit=5000",
        "kind=3",
        "status=bogus",
        "cursor=-1",
        "cursor=1&offset=1",
        "campaign_id=x",
    ):
        resp = client.simulate_get("/api/v1/messages", query_string=query, headers=AUTH)
        assert resp.status_code == 400, query


# --- health and metrics ------------------------------------------------------------


def test_healthz_readyz_metrics(build):
    client, _ = build()
    assert client.simulate_get("/healthz").json == {"status": "ok"}
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"database": "ok", "queue": "ok"}
    client.simulate_post("/webhooks/wassenger", json=inbound("G1"))
    text = client.simulate_get("/metrics").text
    assert 'campaignd_queue_depth{queue="messages"}' in text
    assert "campaignd_queue_up 1.0" in text
    assert (
        'campaignd_webhook_events_total{event="message:in:new",provider="wassenger"}'
        in text
    )


def test_readyz_names_the_failed_dependency(make_config):
    cfg = make_config("sqlite")
    open_database(cfg, migrate_schema=True)
    database.close()
    # A Redis queue on a port nobody listens on: the queue is unreachable.
    dead = make_config(
        "sqlite",
        {"queue": {"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0"}},
    )
    client = testing.TestClient(
        create_app(cfg, RecordingTasks(), queues=make_queues(dead))
    )
    resp = client.simulate_get("/readyz")
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "5"
    assert resp.json["checks"]["database"] == "ok"
    assert resp.json["checks"]["failed"] == ["queue"]
    assert "campaignd_queue_up 0.0" in client.simulate_get("/metrics").text


# --- the OpenAPI document ----------------------------------------------------------


def test_openapi_describes_every_route(build):
    client, _ = build()
    app = client.app
    spec = client.simulate_get("/api/v1/openapi.json").json
    assert spec == json.loads(json.dumps(build_spec()))
    assert spec["openapi"].startswith("3.1")
    routes = set()
    for node in _route_nodes(app._router._roots):
        template = node.uri_template.replace(
            "{campaign_id:int(min=1, max=2147483647)}", "{campaign_id}"
        )
        if not template.startswith("/ui"):  # the HTML console is not the API
            routes.add(template)
    assert routes == set(spec["paths"])
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (path, method)


def _route_nodes(nodes):
    for node in nodes:
        if node.resource is not None:
            yield node
        yield from _route_nodes(node.children)


def test_falcon_version_supports_what_we_use():
    assert hasattr(falcon, "HTTPContentTooLarge")


def test_meta_url_token_when_there_is_no_app_secret(build):
    client, _ = build({"web": {"webhook_secret": "tok"}})
    body = fixture("meta_message_text.json")
    assert client.simulate_post("/webhooks/whatsapp", json=body).status_code == 401
    resp = client.simulate_post(
        "/webhooks/whatsapp", json=body, params={"token": "tok"}
    )
    assert resp.status_code == 200


def test_large_meta_batch_with_repeats_inside(build):
    client, tasks = build()
    body = fixture("meta_status_delivered.json")
    value = body["entry"][0]["changes"][0]["value"]
    template = value["statuses"][0]
    value["statuses"] = [dict(template, id=f"wamid.{i}") for i in range(450)]
    value["statuses"] += value["statuses"][:10]  # the same status twice
    resp = client.simulate_post("/webhooks/whatsapp", json=body)
    assert resp.json == {"stored": 450, "duplicates": 10}
    assert client.app.wait_enqueued()  # the enqueue follows, in another thread
    assert len(stored_events()) == 450 == len(set(tasks.events))
    again = client.simulate_post("/webhooks/whatsapp", json=body)
    assert again.json == {"stored": 0, "duplicates": 460}


def test_beyond_loopback_a_route_that_cannot_check_its_sender_is_not_served(build):
    """Meta configured with its app secret only: the Wassenger route has no
    check of its own, so a stranger's fake "reply" there must find nothing."""
    client, tasks = build(
        {
            "web": {"host": "0.0.0.0"},
            "provider": {
                "kind": "meta",
                "app_secret": "appsecret",
                "phone_number_id": "1",
                "token": "t",
            },
        }
    )
    body = fixture("wassenger_message_in_new.json")
    resp = client.simulate_post("/webhooks/wassenger", json=body)
    assert resp.status_code == 404
    assert stored_events() == [] and tasks.events == []
    raw = json.dumps(fixture("meta_message_text.json")).encode()
    signed = {"X-Hub-Signature-256": sign_hmac_sha256("appsecret", raw)}
    resp = client.simulate_post("/webhooks/whatsapp", body=raw, headers=signed)
    assert resp.status_code == 200 and resp.json["stored"] == 1


def test_beyond_loopback_a_route_with_its_own_check_is_served(build):
    """The shared secret checks both routes: each one is served and refuses a
    post without it."""
    client, _ = build(
        {
            "web": {"host": "0.0.0.0", "webhook_secret": "s3cret"},
            "provider": {
                "kind": "meta",
                "app_secret": "appsecret",
                "phone_number_id": "1",
                "token": "t",
            },
        }
    )
    body = fixture("wassenger_message_in_new.json")
    assert client.simulate_post("/webhooks/wassenger", json=body).status_code == 401
    resp = client.simulate_post(
        "/webhooks/wassenger", json=body, headers={"X-Webhook-Secret": "s3cret"}
    )
    assert resp.status_code == 200 and resp.json["stored"] == 1


def test_admin_api_answers_429_after_ten_wrong_tokens_from_one_address(build):
    client, _ = build({"web": {"api_token": TOKEN}})
    wrong = {"Authorization": "Bearer nope"}
    for _ in range(10):
        resp = client.simulate_get("/api/v1/campaigns", headers=wrong)
        assert resp.status_code == 401
    # The eleventh try is not even compared: the right token is refused too.
    for headers in (wrong, AUTH):
        resp = client.simulate_get("/api/v1/campaigns", headers=headers)
        assert resp.status_code == 429, resp.text
        assert resp.json["title"] == "Too many wrong tokens"
        assert 1 <= int(resp.headers["retry-after"]) <= 60
    # Another address is not held back by this one's guesses.
    other = client.simulate_get(
        "/api/v1/campaigns", headers=AUTH, remote_addr="192.0.2.7"
    )
    assert other.status_code == 200
