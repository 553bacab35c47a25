"""Hostile webhook payloads against a POPULATED database, end to end.

tests/integration/test_hostile_http.py posts the same kind of payloads at an
empty database, where processing stops at "unknown contact" / "unknown
message" and never reaches the reply, interaction or status writes. Here a
campaign is running and its contacts are the senders (and its messages the
subjects) of the hostile payloads: odd unicode, huge strings, NUL, lone
surrogates, wrong types and deep nesting. They go through the real waitress
server (secret and signatures), the real ingest, and the worker's processing
task (call_local). Checked: the processing loop survives and processes every
stored event, well-formed events change the rows they name, and nothing
unrelated changes.
"""

from __future__ import annotations

import json

import pytest
import requests

from daemon.domain import campaigns
from daemon.providers.base import sign_hmac_sha256
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.store.models import InboundEvent
from daemon.store.models import MemberState
from daemon.store.models import Message
from tests.event_helpers import contact
from tests.event_helpers import interactions
from tests.event_helpers import member_id
from tests.event_helpers import member_state
from tests.event_helpers import message
from tests.event_helpers import message_of
from tests.event_helpers import meta_reply
from tests.event_helpers import meta_status
from tests.event_helpers import snapshot
from tests.event_helpers import unique
from tests.event_helpers import wassenger_failed
from tests.event_helpers import wassenger_reply
from tests.event_helpers import wassenger_status
from tests.event_helpers import without
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(120)

SECRET = "hostile-secret"
HMAC_KEY = "hostile-hmac"
META_SECRET = "meta-app-secret"
MAX_BODY = 2 * 1_048_576
WASSENGER = "/webhooks/wassenger"
META = "/webhooks/whatsapp"
HUGE = 600_000


class Site:
    """A populated database, the web role on waitress, and the worker's tasks."""

    def __init__(self, cfg):
        self.pipeline = build_pipeline(cfg)
        self.tasks = self.pipeline.tasks
        self.web = WebServer(create_app(cfg, self.tasks), cfg, port=0)
        self.thread = self.web.serve_in_thread()
        self.http = requests.Session()

    def post(self, path: str, raw: bytes) -> requests.Response:
        head = {"Content-Type": "application/json"}
        if path == WASSENGER:
            head["X-Webhook-Secret"] = SECRET
            head["X-Wassenger-Signature"] = sign_hmac_sha256(HMAC_KEY, raw)
        else:
            head["X-Hub-Signature-256"] = sign_hmac_sha256(META_SECRET, raw)
        return self.http.post(self.web.url + path, data=raw, headers=head, timeout=60)

    def close(self):
        self.http.close()
        self.web.stop()
        self.thread.join(10)
        self.pipeline.close()


@pytest.fixture(params=["sqlite", "pgqueue"])
def site(request, make_config, fake):
    extra = {
        "provider": {
            "base_url": fake.url,
            "app_secret": META_SECRET,
            "verify_token": "vt",
        },
        "web": {
            "webhook_secret": SECRET,
            "webhook_hmac_secret": HMAC_KEY,
            "max_body_bytes": MAX_BODY,
        },
    }
    built = Site(mode_config(request, make_config, request.param, extra))
    yield built
    built.close()


def running(site, count: int, *, start: int, name: str):
    contacts = seed_contacts(count, start=start)
    created = new_campaign(contacts, name=name)
    campaigns.start_campaign(created.id, site.tasks)
    site.tasks.fan_out(created.id)
    ids = [message_of(created.id, c).id for c in contacts]
    for message_id in ids:
        assert site.tasks.deliver(message_id) == "sent"
    return created.id, contacts, ids


def nested(depth: int, leaf):
    value = leaf
    for level in range(depth):
        value = {"n": value, "k": [level]} if level % 2 else [value, None]
    return value


def raw(body) -> bytes:
    # ensure_ascii: NUL and lone surrogates travel as \u escapes, as a
    # provider's JSON encoder sends them.
    return json.dumps(body, ensure_ascii=True).encode()


def unprocessed_report() -> list[dict]:
    rows = InboundEvent.select().where(InboundEvent.processed_at.is_null())
    return [
        {
            "id": e.id,
            "type": e.event_type,
            "attempts": e.attempts,
            "last_error": e.last_error,
            "payload": e.payload[:200],
        }
        for e in rows
    ]


def test_hostile_payloads_on_a_running_campaign(site):
    cid, c, ids = running(site, 8, start=0, name="target")
    bystander, b_contacts, b_ids = running(site, 3, start=100, name="bystander")
    phones = [message(i).phone for i in ids]
    m5 = message(ids[5])
    before = snapshot()

    # Right-to-left override, a ZWJ emoji family, a combining accent, a
    # mathematical letter and a BOM.
    odd_unicode = (
        "\u202eiuo\u202c \U0001f469\u200d\U0001f469\u200d\U0001f467"
        " e\u0301 \U0001d4e1 \ufeff"
    )
    deep_reply = wassenger_reply(phones[6], "oui")
    deep_reply["data"]["events"] = nested(24, "leaf")
    deep_reply["device"] = nested(20, 1e308)
    wrong_types_reply = wassenger_reply(phones[7], "x")
    wrong_types_reply["data"]["body"] = {"text": "STOP", "n": [1, 2, {"x": None}]}
    wrong_types_reply["data"]["meta"] = ["isGroup", True]
    wrong_status = wassenger_status("read", msg_id=m5.wa_id)
    wrong_status["data"]["ack"] = {"read": True}
    wrong_status["data"]["reference"] = [m5.idempotency_key]
    wrong_failed = wassenger_failed(error=["x", {"code": 131050}])
    wrong_failed["data"].pop("id")
    wrong_failed["data"]["reference"] = {"$ne": None}
    huge_meta = meta_reply(phones[2], "oui " + "a" * HUGE)
    meta_wrong_status = meta_status("read", m5.wa_id)
    meta_wrong_status["entry"][0]["changes"][0]["value"]["statuses"][0]["status"] = [
        "read"
    ]
    meta_pause_nobody = meta_status(
        "failed", "wamid.\u0000\ud800" + unique("x"), error_code=131048
    )

    posts = [
        # Well-formed replies with hostile text: they must be taken in.
        (WASSENGER, raw(wassenger_reply(phones[0], "oui\u0000merci"))),
        (WASSENGER, raw(wassenger_reply(phones[1], "oui \ud83d"))),
        (META, raw(huge_meta)),
        (WASSENGER, raw(wassenger_reply(phones[3], "  ARRE\u0301T ! "))),
        (WASSENGER, raw(wassenger_reply(phones[4], odd_unicode))),
        (WASSENGER, raw(deep_reply)),
        (WASSENGER, raw(wrong_types_reply)),
        # Garbage about contact 5's message: it must not move.
        (WASSENGER, raw(wrong_status)),
        (WASSENGER, raw(wrong_failed)),
        (META, raw(meta_wrong_status)),
        # A pause code for a message nobody has: nothing pauses.
        (META, raw(meta_pause_nobody)),
        # Unknown senders with hostile bytes in the number.
        (WASSENGER, raw(wassenger_reply("+33 6 99 99 99 99\u0000\ud800", "STOP"))),
        (META, raw(meta_reply("+3369999\u00009999", "STOP"))),
        # The empty-database hostile test's odd payloads.
        (
            WASSENGER,
            b'{"event": "x", "id": "\\ud800 lone surrogate", "data": {"id": 1}}',
        ),
        (WASSENGER, b'{"event": "x\\u0000nul", "data": {"id": "a\\u0000b"}}'),
        (WASSENGER, b'{"id": 1e400, "event": "big", "data": {"id": "1e400"}}'),
        (WASSENGER, b'{"event": "dup", "event": "keys", "data": {"id": "d"}}'),
    ]
    for path, body in posts:
        resp = site.post(path, body)
        assert resp.status_code == 200, (path, body[:120], resp.status_code, resp.text)

    event_ids = sorted(
        e.id
        for e in InboundEvent.select(InboundEvent.id).where(
            InboundEvent.processed_at.is_null()
        )
    )
    assert len(event_ids) == len(posts)
    # The worker's task function over all of them: it returns, it never raises.
    assert site.tasks.process_webhook_events.call_local(event_ids) == len(event_ids)
    assert unprocessed_report() == [], "every stored event must be processed"

    # Contact 0: NUL in the text. Replied, Message 2 queued, text storable.
    assert member_state(cid, c[0]) == MemberState.INTERACTED
    assert message_of(cid, c[0], kind=2).status == "queued"
    (row,) = interactions(c[0])
    assert row.outcome == "message_2"
    assert "\x00" not in row.body and row.body.startswith("oui")
    # Contact 1: a lone surrogate. Replied; the stored text is valid UTF-8.
    assert member_state(cid, c[1]) == MemberState.INTERACTED
    (row,) = interactions(c[1])
    assert row.body.startswith("oui ")
    row.body.encode("utf-8")
    # Contact 2: a 600 kB reply (Meta). Replied; the stored text is bounded.
    assert member_state(cid, c[2]) == MemberState.INTERACTED
    (row,) = interactions(c[2])
    assert row.body.startswith("oui aaa") and len(row.body) <= 4000
    # Contact 3: "ARRÊT" with a combining accent is an opt-out.
    assert contact(c[3]).opted_out_at is not None
    assert member_state(cid, c[3]) == MemberState.OPTED_OUT
    assert [i.outcome for i in interactions(c[3])] == ["opted_out"]
    assert message_of(cid, c[3], kind=2) is None
    # Contact 4: odd but valid unicode is kept as it came.
    assert member_state(cid, c[4]) == MemberState.INTERACTED
    assert interactions(c[4])[0].body == odd_unicode
    # Contact 5: garbage statuses did not move its row.
    assert message(ids[5]).status == "sent"
    assert member_state(cid, c[5]) == MemberState.MESSAGE_1_SENT
    assert interactions(c[5]) == []
    # Contact 6: a good reply wrapped in deep nesting.
    assert member_state(cid, c[6]) == MemberState.INTERACTED
    # Contact 7: a "STOP" that is not text is not an opt-out.
    assert contact(c[7]).opted_out_at is None
    assert member_state(cid, c[7]) in (
        MemberState.MESSAGE_1_SENT,
        MemberState.INTERACTED,
    )

    # Nothing else changed: the bystander campaign, contact 5, the Message 1
    # rows, the campaigns' status; new rows are only the Message 2 above.
    after = snapshot()
    changed_members = [member_id(cid, c[i]) for i in (0, 1, 2, 3, 4, 6, 7)]
    new_messages = [m.id for m in Message.select(Message.id).where(Message.kind == 2)]
    assert {
        m for (m,) in Message.select(Message.contact).where(Message.kind == 2).tuples()
    } <= {c[0], c[1], c[2], c[4], c[6], c[7]}
    expected = without(before, members=changed_members, contacts=[c[3]])
    got = without(
        after, members=changed_members, contacts=[c[3]], messages=new_messages
    )
    expected["interactions"] = got["interactions"] = None
    assert got == expected
    assert campaigns.get_campaign(cid).status == "running"
    assert campaigns.get_campaign(bystander).status == "running"
    assert all(not interactions(b) for b in b_contacts)
    assert all(contact(b).opted_out_at is None for b in b_contacts)
