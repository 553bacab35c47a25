"""Meta's WhatsApp Cloud API end to end: the real daemon (`campaignd run`,
embedded SQLite) with `provider.kind = "meta"`, against the fake provider in
its Meta dialect (Graph API sends, an approved template with two body
parameters, statuses and replies posted to /webhooks/whatsapp signed with
the app secret).

One campaign serves the verdicts: every contact replies, some with STOP
(the fake's deterministic reply_plan says who). Verdicts read what the
contacts' phones show (the fake's per-phone counts and messages) and what
the daemon recorded of the statuses; then a webhook with a bad signature,
and the GET verification handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from daemon import testing as ch
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import reply_plan
from daemon.store.models import Contact
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import database
from tests.meta_helpers import APP_SECRET
from tests.meta_helpers import TEMPLATE
from tests.meta_helpers import VERIFY_TOKEN
from tests.meta_helpers import meta_daemon
from tests.meta_helpers import wait_settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SEED = 11
OPT_OUT_SHARE = 0.4
# Two Mexican mobiles: Meta names them 521... (the fake too), in the replies
# and STOPs that must still reach them.
PHONES = ch.contact_phones(10, invalid_every=0) + ["+525512345678", "+525587654321"]
STOPPERS = {
    p
    for p in PHONES
    if reply_plan(p, seed=SEED, reply_share=1.0, opt_out_share=OPT_OUT_SHARE) == "stop"
}
REPLIERS = set(PHONES) - STOPPERS


@pytest.fixture(scope="module")
def meta_run():
    """The daemon and the fake, and the campaign run to its end:
    (daemon, cfg, fake, campaign_id, web_port)."""
    assert STOPPERS and REPLIERS  # the seed gives both kinds of answer
    work = Path(tempfile.mkdtemp(prefix="meta-e2e-", dir="/tmp"))
    options = FakeOptions(
        ack_delays_ms=(20.0, 40.0, 60.0),
        reply_share=1.0,
        opt_out_share=OPT_OUT_SHARE,
        reply_delay_ms=150.0,
        seed=SEED,
    )
    try:
        with meta_daemon(work, options) as (daemon, cfg, fake, web_port):
            campaign_id = ch.seed_campaign(cfg, PHONES)
            wait_settled(daemon, fake, campaign_id, 60)
            yield daemon, cfg, fake, campaign_id, web_port
    finally:
        shutil.rmtree(work, ignore_errors=True)


def on_phones(fake, kind: str) -> dict[str, int]:
    return {p: c.get(kind, 0) for p, c in fake.phone_counts().items()}


def test_message1_reaches_each_phone_once_as_the_template(meta_run):
    _, _, fake, _, _ = meta_run
    assert on_phones(fake, "m1") == dict.fromkeys(PHONES, 1)
    firsts = {m["phone"]: m for m in fake.messages() if m["kind"] == "m1"}
    for n, phone in enumerate(PHONES, 1):
        # Message 1 "Bonjour {name}, une offre à {city} ...": the template's
        # two body parameters, in the order the text uses them.
        assert firsts[phone]["type"] == "template"
        assert firsts[phone]["template"] == {
            "name": TEMPLATE,
            "language": "fr",
            "parameters": [f"Contact {n}", "Lyon"],
        }
    assert fake.stats()["invalid_requests"] == 0


def test_a_reply_gets_exactly_one_message2_as_text(meta_run):
    _, _, fake, campaign_id, _ = meta_run
    m2 = on_phones(fake, "m2")
    assert {p: m2.get(p, 0) for p in REPLIERS} == dict.fromkeys(REPLIERS, 1)
    seconds = [m for m in fake.messages() if m["kind"] == "m2"]
    assert {m["type"] for m in seconds} == {"text"}
    assert all(m["body"].startswith(ch.MESSAGE2_MARK) for m in seconds)
    assert fake.duplicates() == {}
    assert ch.campaign_state(campaign_id)["status"] == "completed"


def test_a_stop_opts_the_contact_out_and_no_message2_goes(meta_run):
    _, _, fake, _, _ = meta_run
    assert fake.stats()["opt_outs_sent"] == len(STOPPERS)
    m2 = on_phones(fake, "m2")
    assert not any(m2.get(p, 0) for p in STOPPERS)
    with database.connection_context():
        opted = {
            c.phone for c in Contact.select().where(Contact.opted_out_at.is_null(False))
        }
    assert opted == STOPPERS


def test_statuses_sent_delivered_read_are_recorded(meta_run):
    _, _, fake, campaign_id, _ = meta_run
    with database.connection_context():
        rows = list(
            Message.select(Message, Contact)
            .join(Contact)
            .where(Message.campaign == campaign_id)
        )
        stored = {
            e.event_type
            for e in InboundEvent.select().where(InboundEvent.provider == "meta")
        }
    by_wamid = {m["id"]: m for m in fake.messages()}
    assert len(rows) == len(PHONES) + len(REPLIERS)
    # Each row holds the wamid the fake answered, and its last status: read.
    assert {r.status for r in rows} == {"read"}
    assert all(by_wamid[r.provider_id]["reference"] == r.idempotency_key for r in rows)
    assert {"status:sent", "status:delivered", "status:read", "message"} <= stored
    assert fake.stats()["webhooks_failed"] == 0


def reply_body(phone: str, text: str, msg_id: str) -> bytes:
    digits = phone.lstrip("+")
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000001", "phone_number_id": "1"},
        "contacts": [{"profile": {"name": "X"}, "wa_id": digits}],
        "messages": [
            {
                "from": digits,
                "id": msg_id,
                "timestamp": str(int(time.time())),
                "type": "text",
                "text": {"body": text},
            }
        ],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(body).encode()


def post(port: int, raw: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/webhooks/whatsapp", raw, headers)
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def opted_out(phone: str) -> bool:
    with database.connection_context():
        return Contact.get(Contact.phone == phone).opted_out_at is not None


def test_a_webhook_with_a_bad_signature_is_refused_and_changes_nothing(meta_run):
    _, _, fake, _, web_port = meta_run
    phone = sorted(REPLIERS)[0]
    msg_id = "wamid.e2e-forged-stop"
    raw = reply_body(phone, "STOP", msg_id)
    good = "sha256=" + hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    other = "sha256=" + hmac.new(b"not-the-secret", raw, hashlib.sha256).hexdigest()
    tampered = raw.replace(b"STOP", b"stop")
    sent_before = fake.stats()["sends_accepted"]
    for body, signature in ((raw, other), (raw, None), (tampered, good)):
        assert 400 <= post(web_port, body, signature) < 500
    with database.connection_context():
        assert (
            InboundEvent.select()
            .where(InboundEvent.dedupe_key == f"msg:{msg_id}")
            .count()
            == 0
        )
    assert not opted_out(phone)
    # Signed with the app secret, the same STOP is taken: the check above
    # could have seen a change.
    assert post(web_port, raw, good) == 200
    ch.wait_until(lambda: opted_out(phone), 20, 0.1, "the signed STOP applied")
    assert fake.stats()["sends_accepted"] == sent_before


def test_the_verification_handshake_answers_the_challenge(meta_run):
    _, _, _, _, web_port = meta_run

    def get(token: str) -> tuple[int, bytes]:
        query = urllib.parse.urlencode(
            {
                "hub.mode": "subscribe",
                "hub.verify_token": token,
                "hub.challenge": "1158201444",
            }
        )
        conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=10)
        try:
            conn.request("GET", f"/webhooks/whatsapp?{query}")
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    assert get(VERIFY_TOKEN) == (200, b"1158201444")
    assert get("wrong-token")[0] == 403
