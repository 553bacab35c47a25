"""MetaProvider against a loopback stub of the Graph API (the real one is remote)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon.config import ProviderConfig
from daemon.providers import make_provider
from daemon.providers import webhook_parser
from daemon.providers.base import PauseCampaignError
from daemon.providers.base import PermanentError
from daemon.providers.base import RecipientOptedOutError
from daemon.providers.base import RetryableError
from daemon.providers.meta import MetaProvider
from daemon.providers.meta import template_parameters

pytestmark = pytest.mark.timeout(30)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "providers"
SEND_OK = json.loads((FIXTURES / "meta_send_response.json").read_text())
WAMID = SEND_OK["messages"][0]["id"]


class GraphStub:
    """Records requests; answers with ``self.status``, ``self.body``, headers."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.body: dict = SEND_OK
        self.headers: dict[str, str] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length) if length else b""
                stub.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "json": json.loads(raw) if raw else None,
                    }
                )
                data = json.dumps(stub.body).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in stub.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def stub():
    server = GraphStub()
    yield server
    server.close()


def meta(url: str, **overrides) -> MetaProvider:
    settings = {
        "kind": "meta",
        "base_url": url,
        "token": "EAAG-token",
        "phone_number_id": "106540352242922",
        "template_name": "campaign_intro",
        "template_language": "fr",
    }
    settings.update(overrides)
    provider = make_provider(ProviderConfig(**settings))
    assert isinstance(provider, MetaProvider)
    return provider


def test_template_for_message_1(stub):
    p = meta(stub.url)
    variables = {"2": "Paris", "10": "fin", "1": "Marie"}
    result = p.send("+22890123456", "ignored", "c42:m1", kind=1, variables=variables)
    assert (result.provider_id, result.wa_id, result.raw_status) == (
        WAMID,
        WAMID,
        "accepted",
    )
    [req] = stub.requests
    assert req["method"] == "POST"
    assert req["path"] == "/v21.0/106540352242922/messages"
    assert req["headers"]["Authorization"] == "Bearer EAAG-token"
    assert req["json"] == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "22890123456",
        "type": "template",
        "template": {
            "name": "campaign_intro",
            "language": {"code": "fr", "policy": "deterministic"},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": "Marie"},
                        {"type": "text", "text": "Paris"},
                        {"type": "text", "text": "fin"},
                    ],
                }
            ],
        },
        "biz_opaque_callback_data": "c42:m1",
    }
    p.close()


def test_template_without_variables_has_no_components(stub):
    p = meta(stub.url)
    p.send("+22890123456", "x", "c42:m1", kind=1, variables={})
    assert "components" not in stub.requests[0]["json"]["template"]
    p.close()


def test_text_for_message_2(stub):
    p = meta(stub.url)
    stub.body = {
        "messaging_product": "whatsapp",
        "messages": [{"id": "wamid.2", "message_status": "accepted"}],
    }
    result = p.send("+22890123456", "Voici le lien", "c42:m2", kind=2, variables={})
    assert (result.provider_id, result.raw_status) == ("wamid.2", "accepted")
    body = stub.requests[0]["json"]
    assert body["type"] == "text"
    assert body["text"] == {"preview_url": False, "body": "Voici le lien"}
    assert body["biz_opaque_callback_data"] == "c42:m2"
    assert "template" not in body
    p.close()


def test_parameter_order_rule():
    # Numbered keys by number, then the others in the order given.
    assert template_parameters({"b": "2", "a": "1", "3": "x", "1": "y"}) == [
        "y",
        "x",
        "2",
        "1",
    ]


def test_missing_template_name_pauses_without_a_request(stub):
    p = meta(stub.url, template_name="")
    with pytest.raises(PauseCampaignError, match="template_name"):
        p.send("+22890123456", "x", "r", kind=1, variables={})
    assert stub.requests == []
    p.close()


def graph_error(code: int, message: str = "oops") -> dict:
    return {
        "error": {
            "message": message,
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": "why"},
            "fbtrace_id": "Az",
        }
    }


@pytest.mark.parametrize(
    "status, code, expected",
    [
        (400, 130429, RetryableError),
        (400, 131056, RetryableError),
        (400, 80007, RetryableError),
        (400, 131049, RetryableError),
        (400, 131026, PermanentError),
        (400, 131047, PermanentError),
        (400, 131050, RecipientOptedOutError),
        (400, 131048, PauseCampaignError),
        (400, 132015, PauseCampaignError),
        (401, 190, PauseCampaignError),
        (400, 190, PauseCampaignError),
        (403, 10, PauseCampaignError),
        (400, 100, PermanentError),
        (500, 1, RetryableError),
        (503, 999999, RetryableError),
        (429, 4, RetryableError),
    ],
)
def test_error_code_table(stub, status, code, expected):
    p = meta(stub.url)
    stub.status, stub.body = status, graph_error(code, "Message failed")
    with pytest.raises(expected) as err:
        p.send("+22890123456", "x", "r", kind=2, variables={})
    assert type(err.value) is expected
    assert err.value.code == code and err.value.http_status == status
    assert f"HTTP {status}: ({code}) Message failed: why" in err.value.reason
    p.close()


def test_retry_after_header_and_marketing_cap(stub):
    p = meta(stub.url)
    stub.status, stub.body = 400, graph_error(130429)
    stub.headers = {"Retry-After": "12"}
    with pytest.raises(RetryableError) as err:
        p.send("+22890123456", "x", "r", kind=2, variables={})
    assert err.value.retry_after == 12.0
    stub.body = graph_error(131049)
    with pytest.raises(RetryableError) as err:
        p.send("+22890123456", "x", "r", kind=2, variables={})
    assert err.value.retry_after >= 86400
    p.close()


def test_non_json_error_body(stub):
    p = meta(stub.url)
    stub.status, stub.body = 502, "Bad gateway"  # type: ignore[assignment]
    with pytest.raises(RetryableError, match="HTTP 502"):
        p.send("+22890123456", "x", "r", kind=2, variables={})
    p.close()


def test_device_status_and_number_check(stub):
    p = meta(stub.url)
    stub.body = {"display_phone_number": "15550783881", "quality_rating": "GREEN"}
    assert p.device_status() == {
        "ok": True,
        "detail": "number 15550783881 quality GREEN",
    }
    assert stub.requests[0]["path"].startswith("/v21.0/106540352242922?fields=")
    stub.status, stub.body = 401, graph_error(190, "Token expired")
    status = p.device_status()
    assert status["ok"] is False and "Token expired" in status["detail"]
    # No pre-send check on the Cloud API: every number "exists", no request.
    before = len(stub.requests)
    assert p.check_number("+22890123456").exists is True
    assert len(stub.requests) == before
    assert p.supports_number_check is False
    p.close()


def test_our_reference_goes_out_as_biz_opaque_callback_data_and_comes_back(stub):
    """The idempotency key sent with a message is what Meta echoes in its status
    webhooks, and the parser reads it back as the status's reference."""
    p = meta(stub.url)
    reference = "cd-42-981-m1"
    p.send("+22890123456", "x", reference, kind=1, variables={"1": "Marie"})
    p.send("+22890123456", "Voici le lien", "cd-42-981-m2", kind=2, variables={})
    sent = [req["json"]["biz_opaque_callback_data"] for req in stub.requests]
    assert sent == [reference, "cd-42-981-m2"]
    # No reference: no key (Meta would echo nothing).
    p.send("+22890123456", "x", "", kind=2, variables={})
    assert "biz_opaque_callback_data" not in stub.requests[-1]["json"]
    status = {
        "id": WAMID,
        "status": "delivered",
        "timestamp": "1710000000",
        "recipient_id": "22890123456",
        "biz_opaque_callback_data": sent[0],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "statuses": [status],
                        },
                    }
                ],
            }
        ],
    }
    parser = webhook_parser("meta")
    [(_, item)] = parser.split(body)
    event = parser.parse(item)
    assert (event.status, event.reference, event.wa_id) == (
        "delivered",
        reference,
        WAMID,
    )
    p.close()
