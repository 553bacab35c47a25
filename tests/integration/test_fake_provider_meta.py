"""The fake provider's Meta dialect speaks the WhatsApp Cloud API, through
campaignd's own Meta client and webhook parser: Graph API sends and answers,
Meta's errors, never a dedupe, statuses and replies in Meta's signed
envelope, and what Meta does that Wassenger does not (a send to a number not
on WhatsApp, or a text outside the 24 h window, is accepted, then fails).
"""

from __future__ import annotations

import argparse
import json

import pytest

from daemon.config import ProviderConfig
from daemon.providers import webhook_parser
from daemon.providers.base import InboundMessage
from daemon.providers.base import PermanentError
from daemon.providers.base import RetryableError
from daemon.providers.base import StatusUpdate
from daemon.providers.base import verify_hmac_sha256
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.providers.fake import add_arguments
from daemon.providers.fake import options_from_args
from daemon.providers.meta import MetaProvider
from tests.helpers import FAST_ACKS
from tests.helpers import Receiver
from tests.helpers import call
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)

TOKEN = "EAAG-fake-token"
SECRET = "app-secret"
PHONE_ID = FakeOptions().phone_number_id
MESSAGES = f"/v21.0/{PHONE_ID}/messages"
BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def meta_fake(**changes) -> FakeProvider:
    return FakeProvider(FakeOptions(dialect="meta", token=TOKEN, **changes))


def client(fake: FakeProvider, **changes) -> MetaProvider:
    values = {
        "kind": "meta",
        "base_url": fake.url,
        "token": TOKEN,
        "phone_number_id": PHONE_ID,
        "template_name": "campaign_intro",
        "timeout_s": 5.0,
        **changes,
    }
    return MetaProvider(ProviderConfig(**values))


def template_body(to: str, ref: str, name="campaign_intro", params=("Marie",)):
    return {
        "messaging_product": "whatsapp",
        "to": to,
        "type": "template",
        "template": {
            "name": name,
            "language": {"code": "fr"},
            "components": [
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": p} for p in params],
                }
            ],
        },
        "biz_opaque_callback_data": ref,
    }


def graph_error(answer) -> dict:
    status, _, body = answer
    err = body["error"]
    assert err["type"] == "OAuthException" and err["fbtrace_id"], body
    return {"status": status, "code": err["code"], "message": err["message"]}


def test_a_template_send_answers_as_the_cloud_api_and_is_never_deduped():
    with meta_fake() as fake:
        p = client(fake)
        variables = {"2": "Lyon", "1": "Marie"}
        first = p.send("+33612345671", "x", "cd-4-1-m1", kind=1, variables=variables)
        again = p.send("+33612345671", "x", "cd-4-1-m1", kind=1, variables=variables)
        assert first.provider_id.startswith("wamid.")
        assert first.raw_status == "accepted"
        assert again.provider_id != first.provider_id  # a second message
        body = template_body("33612345672", "r")
        status, _, body = call(fake, "POST", MESSAGES, body, BEARER)
        assert status == 200
        assert body["messaging_product"] == "whatsapp"
        assert body["contacts"] == [{"input": "33612345672", "wa_id": "33612345672"}]
        assert body["messages"][0]["message_status"] == "accepted"
        [m1, m2, _] = fake.messages()
        assert m1["type"] == "template" and m1["kind"] == "m1"
        assert m1["template"] == {
            "name": "campaign_intro",
            "language": "fr",
            "parameters": ["Marie", "Lyon"],
        }
        # What the phones show, keyed as the phone number is written.
        assert fake.phone_counts() == {
            "+33612345671": {"m1": 2},
            "+33612345672": {"other": 1},
        }
        assert fake.duplicates() == {"+33612345671": {"m1": 2}}
        assert fake.stats()["duplicate_requests"] == 1
        p.close()


def test_graph_api_errors_have_meta_shapes_codes_and_statuses():
    with meta_fake(templates=("campaign_intro:1",)) as fake:
        bad_token = {**BEARER, "Authorization": "Bearer nope"}
        answer = call(
            fake, "POST", MESSAGES, template_body("33612345671", "r"), bad_token
        )
        assert graph_error(answer)["status"] == 401
        assert graph_error(answer)["code"] == 190
        no_auth = call(fake, "POST", MESSAGES, template_body("33612345671", "r"))
        assert graph_error(no_auth)["code"] == 190

        def post(body, path=MESSAGES):
            return graph_error(call(fake, "POST", path, body, BEARER))

        body = template_body("33612345671", "r")
        del body["messaging_product"]
        assert post(body) == {
            "status": 400,
            "code": 100,
            "message": "(#100) The parameter messaging_product is required.",
        }
        assert post({**template_body("33612345671", "r"), "to": "hello"})["code"] == 100
        text = {"messaging_product": "whatsapp", "to": "33612345671", "type": "text"}
        assert post(text)["message"] == "(#100) The parameter text['body'] is required."
        assert post(template_body("33612345671", "r", name="nope"))["code"] == 132001
        assert post(template_body("33612345671", "r", name="nope"))["status"] == 404
        two = template_body("33612345671", "r", params=("Marie", "Lyon"))
        assert post(two) == {
            "status": 400,
            "code": 132000,
            "message": "(#132000) Number of parameters does not match the expected"
            " number of params",
        }
        other_number = post(template_body("33612345671", "r"), "/v21.0/999/messages")
        assert (other_number["status"], other_number["code"]) == (400, 100)
        assert post(template_body("33612345671", "r"), "/v1/messages")["code"] == 2500
        assert fake.messages() == [] and fake.phone_counts() == {}
        assert fake.stats()["unauthorized"] == 2

        # campaignd's client reads them as what they are.
        with pytest.raises(PermanentError, match=r"132000"):
            client(fake).send("+33612345671", "x", "r", kind=1, variables={})
        with pytest.raises(PermanentError, match=r"\(190\)"):
            client(fake, token="nope").send("+33612345671", "x", "r", kind=2)


def test_injected_faults_are_meta_errors_the_client_retries():
    with meta_fake(down=True) as fake:
        p = client(fake)
        with pytest.raises(RetryableError, match=r"HTTP 503: \(2\)"):
            p.send("+33612345671", "x", "cd-1-1-m1", kind=1, variables={"1": "A"})
        fake.configure(down=False, rate_limit_rate=1.0)
        with pytest.raises(RetryableError, match=r"HTTP 400: \(130429\)") as exc:
            p.send("+33612345671", "x", "cd-1-1-m1", kind=1, variables={"1": "A"})
        assert exc.value.retry_after is None  # Meta sends no Retry-After
        fake.configure(rate_limit_rate=0.0, fail_after_accept_rate=1.0)
        with pytest.raises(RetryableError, match=r"HTTP 500: \(131000\)"):
            p.send("+33612345671", "x", "cd-1-1-m1", kind=1, variables={"1": "A"})
        # Accepted all the same: the phone has it.
        assert fake.phone_counts() == {"+33612345671": {"m1": 1}}
        p.close()


def test_device_status_reads_the_phone_number_object():
    with meta_fake() as fake:
        assert client(fake).device_status() == {
            "ok": True,
            "detail": "number +15550000001 quality GREEN",
        }
        status, _, body = call(
            fake, "GET", f"/v21.0/{PHONE_ID}?fields=quality_rating", None, BEARER
        )
        assert (status, body) == (200, {"quality_rating": "GREEN", "id": PHONE_ID})
        assert client(fake, phone_number_id="42").device_status()["ok"] is False
        assert fake.stats()["device_checks"] == 2


def signed_events(receiver: Receiver) -> list:
    """Every webhook posted, its signature checked, as campaignd parses it."""
    parser = webhook_parser("meta")
    events = []
    for headers, raw in receiver.raw:
        assert "X-Webhook-Secret" not in headers
        assert verify_hmac_sha256(SECRET, raw, headers["X-Hub-Signature-256"])
        body = json.loads(raw)
        assert body["object"] == "whatsapp_business_account"
        assert body["entry"][0]["changes"][0]["field"] == "messages"
        value = body["entry"][0]["changes"][0]["value"]
        assert value["metadata"] == {
            "display_phone_number": "15550000001",
            "phone_number_id": PHONE_ID,
        }
        events += [(value, parser.parse(item)) for _, item in parser.split(body)]
    return events


def test_statuses_and_replies_come_in_metas_signed_envelope(receiver):
    opts = {
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        "ack_delays_ms": FAST_ACKS,
        "reply_share": 1.0,
        "reply_delay_ms": 30.0,
        "reply_text": "Oui",
    }
    with meta_fake(**opts) as fake:
        p = client(fake)
        sent = p.send("+33612345671", "x", "cd-4-1-m1", kind=1, variables={"1": "A"})
        wait_for(lambda: fake.stats()["webhooks_sent"] == 4, what="4 webhooks")
        events = signed_events(receiver)
        statuses = [(v, e) for v, e in events if isinstance(e, StatusUpdate)]
        assert sorted(e.status for _, e in statuses) == ["delivered", "read", "sent"]
        for value, event in statuses:
            assert event.reference == "cd-4-1-m1"
            assert event.provider_message_id == sent.provider_id
            [raw_status] = value["statuses"]
            assert raw_status["recipient_id"] == "33612345671"
            if raw_status["status"] != "read":
                assert raw_status["pricing"]["category"] == "marketing"
                assert raw_status["conversation"]["origin"]["type"] == "marketing"
        [(value, reply)] = [(v, e) for v, e in events if isinstance(e, InboundMessage)]
        assert (reply.from_phone, reply.body) == ("+33612345671", "Oui")
        assert reply.provider_message_id.startswith("wamid.")
        assert value["contacts"][0]["wa_id"] == "33612345671"
        assert value["messages"][0]["context"] == {
            "from": "15550000001",
            "id": sent.provider_id,
        }
        # The reply opened the window: a text now reaches the phone.
        p.send("+33612345671", "Merci", "cd-4-1-m2", kind=2)
        assert fake.phone_counts() == {"+33612345671": {"m1": 1, "m2": 1}}
        p.close()


def test_a_mexican_mobile_is_named_by_its_whatsapp_id(receiver):
    """As at Meta: sent to +52 and 10 digits, answered and replied from 521
    and the same 10 digits (campaignd matches it: whatsapp_variants)."""
    opts = {
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        "ack_delays_ms": FAST_ACKS[:1],
        "reply_share": 1.0,
        "reply_delay_ms": 30.0,
    }
    with meta_fake(**opts) as fake:
        answer = call(
            fake, "POST", MESSAGES, template_body("525512345678", "cd-1-1-m1"), BEARER
        )
        assert answer[2]["contacts"] == [
            {"input": "525512345678", "wa_id": "5215512345678"}
        ]
        wait_for(lambda: fake.stats()["webhooks_sent"] == 2, what="2 webhooks")
        events = signed_events(receiver)
        [(_, reply)] = [(v, e) for v, e in events if isinstance(e, InboundMessage)]
        assert reply.from_phone == "+5215512345678"
        [(status, _)] = [(v, e) for v, e in events if isinstance(e, StatusUpdate)]
        assert status["statuses"][0]["recipient_id"] == "5215512345678"
        # What the phone received is counted under the number sent to.
        assert fake.phone_counts() == {"+525512345678": {"m1": 1}}


def test_undeliverable_sends_are_accepted_then_fail_and_reach_no_phone(receiver):
    opts = {
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        "ack_delays_ms": FAST_ACKS,
        "reply_share": 1.0,
    }
    with meta_fake(**opts) as fake:
        p = client(fake)
        # Not on WhatsApp: 200, then failed 131026.
        lost = p.send("+33620000000", "x", "cd-1-1-m1", kind=1, variables={"1": "A"})
        # Free text to someone who never wrote: 200, then failed 131047.
        cold = p.send("+33612345671", "Merci", "cd-1-2-m2", kind=2)
        # A share of sends fail by status with the configured code.
        fake.configure(status_failure_share=1.0, status_failure_code=131050)
        stop = p.send("+33612345672", "x", "cd-1-3-m1", kind=1, variables={"1": "A"})
        wait_for(lambda: fake.stats()["webhooks_sent"] == 3, what="3 statuses")
        failed = {e.provider_message_id: e for _, e in signed_events(receiver)}
        assert {e.status for e in failed.values()} == {"failed"}
        assert failed[lost.provider_id].error_code == 131026
        assert failed[cold.provider_id].error_code == 131047
        assert failed[stop.provider_id].error_code == 131050
        assert failed[stop.provider_id].campaign_action == "opt_out"
        assert failed[cold.provider_id].reference == "cd-1-2-m2"
        # Nothing reached a phone, and nobody replied to what they never got.
        assert fake.phone_counts() == {}
        stats = fake.stats()
        assert stats["undeliverable"] == 3 and stats["replies_sent"] == 0
        assert [m["failed_code"] for m in fake.messages()] == [131026, 131047, 131050]
        p.close()


def test_dialect_options_and_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--dialect", "meta", "--template", "intro:2", "--phone-number-id", "77"]
    )
    opts = options_from_args(args)
    assert (opts.dialect, opts.templates, opts.phone_number_id) == (
        "meta",
        ("intro:2",),
        "77",
    )
    assert options_from_args(parser.parse_args([])).dialect == "wassenger"
    for bad in (
        {"dialect": "twilio"},
        {"dialect": "meta", "dedupe": True},
        {"templates": ("intro:x",)},
    ):
        with pytest.raises(ValueError):
            FakeProvider(FakeOptions(**bad))
