"""Helpers for the tests that apply real webhook events to real rows.

Payloads start from the captured provider payloads in tests/fixtures/providers
and change only the fields a test is about (ids, reference, status, phone,
body, error). They go in through the real ingest (WebhookIngest: the parser's
split, the dedupe key, the stored row) and out through Tasks.process_event.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

from daemon.domain import campaigns
from daemon.providers import webhook_parser
from daemon.roles.web.webhooks import WebhookIngest
from daemon.roles.web.webhooks import storable_key
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import InboundEvent
from daemon.store.models import Interaction
from daemon.store.models import Message
from daemon.store.models import utcnow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "providers"
_ids = itertools.count(1)


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def unique(prefix: str) -> str:
    return f"{prefix}{time.monotonic_ns():X}{next(_ids):04X}"


# ---------------------------------------------------------------- payloads


def wassenger_status(
    ack: str,
    *,
    msg_id: str | None = None,
    reference: str | None = None,
    wa_id: str | None = None,
    phone: str = "+22890123456",
) -> dict:
    """A `message:out:ack` webhook (the fixture), for one of our messages."""
    body = fixture("wassenger_message_out_ack.json")
    msg_id = msg_id or unique("3EB0")
    now = int(time.time())
    body["id"] = msg_id
    body["created"] = now
    data = body["data"]
    data.update(id=msg_id, ack=ack, timestamp=now, toNumber=phone)
    data["to"] = phone.lstrip("+") + "@c.us"
    if reference is None:
        data.pop("reference", None)
    else:
        data["reference"] = reference
    if wa_id is not None:
        data["waId"] = wa_id
    return body


def wassenger_failed(
    *,
    msg_id: str | None = None,
    reference: str | None = None,
    error: dict | str | None = None,
) -> dict:
    """A `message:out:failed` webhook (the fixture)."""
    body = fixture("wassenger_message_out_failed.json")
    msg_id = msg_id or unique("3EB0")
    now = int(time.time())
    body["id"] = msg_id
    body["created"] = now
    data = body["data"]
    data.update(id=msg_id, timestamp=now)
    if reference is None:
        data.pop("reference", None)
    else:
        data["reference"] = reference
    if error is not None:
        data["error"] = error
    return body


def wassenger_reply(
    phone: str,
    text: str,
    *,
    msg_id: str | None = None,
    group: bool = False,
    written: float | None = None,
) -> dict:
    """A `message:in:new` webhook (the captured fixture) from `phone`,
    written now or at `written` (epoch seconds)."""
    body = fixture("wassenger_message_in_new.json")
    msg_id = msg_id or unique("ACB1")
    now = int(time.time() if written is None else written)
    wid = phone.lstrip("+") + "@c.us"
    body["id"] = msg_id
    body["created"] = now
    data = body["data"]
    data.update(id=msg_id, body=text, timestamp=now, fromNumber=phone)
    data["from"] = wid
    data["date"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))
    chat = data["chat"]
    chat["id"] = wid
    chat["contact"].update(wid=wid, phone=phone)
    if group:
        group_id = "120363041234567890@g.us"
        chat.update(id=group_id, type="group")
        data["from"] = group_id
        data["meta"]["isGroup"] = True
    return body


def meta_status(
    status: str,
    wamid: str,
    *,
    reference: str | None = None,
    error_code: int | str | None = None,
    recipient: str = "5516992318222",
) -> dict:
    """A status webhook (the captured fixture); `failed` carries errors[]."""
    body = fixture("meta_status_delivered.json")
    item = body["entry"][0]["changes"][0]["value"]["statuses"][0]
    item.update(id=wamid, status=status, timestamp=str(int(time.time())))
    item["recipient_id"] = recipient.lstrip("+")
    if reference is not None:
        item["biz_opaque_callback_data"] = reference
    if status == "failed":
        failed = fixture("meta_status_failed.json")
        errors = failed["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"]
        errors = copy.deepcopy(errors)
        if error_code is not None:
            errors[0]["code"] = error_code
            errors[0]["title"] = errors[0]["message"] = f"error {error_code}"
        item["errors"] = errors
        item.pop("conversation", None)
        item.pop("pricing", None)
    return body


def meta_reply(
    phone: str, text: str, *, msg_id: str | None = None, group_id: str | None = None
) -> dict:
    """An incoming text message (the fixture) from `phone`."""
    body = fixture("meta_message_text.json")
    value = body["entry"][0]["changes"][0]["value"]
    digits = phone.lstrip("+")
    value["contacts"][0]["wa_id"] = digits
    message = value["messages"][0]
    message.update(
        {
            "from": digits,
            "id": msg_id or unique("wamid.IN"),
            "timestamp": str(int(time.time())),
            "text": {"body": text},
        }
    )
    if group_id is not None:
        message["group_id"] = group_id
    return body


# ---------------------------------------------------------------- ingest


class Events:
    """The real ingest of both providers, and processing through Tasks."""

    def __init__(self, tasks, clock: Callable = utcnow):
        self.tasks = tasks
        self._ingest = {
            kind: WebhookIngest(kind, tasks, clock=clock)
            for kind in ("wassenger", "meta")
        }

    def store(self, provider: str, body: dict) -> list[int]:
        """Ingest `body` as the webhook route would; the ids of its rows."""
        self._ingest[provider].ingest(body)
        keys = [storable_key(k) for k, _ in webhook_parser(provider).split(body)]
        rows = InboundEvent.select(InboundEvent.id).where(
            InboundEvent.dedupe_key.in_(keys)
        )
        ids = sorted(e.id for e in rows)
        assert ids, f"nothing stored for {body}"
        return ids

    def apply(self, provider: str, body: dict) -> list[str]:
        """Store, then process each stored item; the outcomes."""
        return [self.tasks.process_event(i) for i in self.store(provider, body)]


def event(event_id: int) -> InboundEvent:
    return InboundEvent.get_by_id(event_id)


# ---------------------------------------------------------------- rows


def message(message_id: int) -> Message:
    return Message.get_by_id(message_id)


def member_state(campaign_id: int, contact_id: int) -> str:
    return (
        CampaignContact.get(
            CampaignContact.campaign == campaign_id,
            CampaignContact.contact == contact_id,
        )
    ).state


def contact(contact_id: int) -> Contact:
    return Contact.get_by_id(contact_id)


def campaign(campaign_id: int):
    return campaigns.get_campaign(campaign_id)


def message_of(campaign_id: int, contact_id: int, kind: int = 1) -> Message | None:
    return Message.get_or_none(
        Message.campaign == campaign_id,
        Message.contact == contact_id,
        Message.kind == kind,
    )


def interactions(contact_id: int) -> list[Interaction]:
    return list(
        Interaction.select()
        .where(Interaction.contact == contact_id)
        .order_by(Interaction.id)
    )


def snapshot() -> dict:
    """Every row a webhook could change, to compare before and after."""
    return {
        "messages": sorted(
            Message.select(
                Message.id,
                Message.status,
                Message.error,
                Message.provider_id,
                Message.wa_id,
                Message.delivered_at,
                Message.read_at,
                Message.failed_at,
            ).tuples()
        ),
        "members": sorted(
            CampaignContact.select(
                CampaignContact.id, CampaignContact.state, CampaignContact.interacted_at
            ).tuples()
        ),
        "contacts": sorted(Contact.select(Contact.id, Contact.opted_out_at).tuples()),
        "campaigns": sorted(
            (c["id"], c["status"], c.get("status_reason", ""))
            for c in campaigns.list_campaigns()
        ),
        "interactions": Interaction.select().count(),
    }


def without(snap: dict, *, messages=(), members=(), contacts=()) -> dict:
    """`snap` minus the rows a test expects to change."""
    out = dict(snap)
    out["messages"] = [m for m in snap["messages"] if m[0] not in set(messages)]
    out["members"] = [m for m in snap["members"] if m[0] not in set(members)]
    out["contacts"] = [c for c in snap["contacts"] if c[0] not in set(contacts)]
    return out


def member_id(campaign_id: int, contact_id: int) -> int:
    return (
        CampaignContact.get(
            CampaignContact.campaign == campaign_id,
            CampaignContact.contact == contact_id,
        )
    ).id


# ---------------------------------------------------------------- Graph API stub


class GraphStub:
    """A loopback stand-in for Meta's Graph API send endpoint.

    Accepts every send with a new wamid, unless the recipient's digits are in
    `errors`: then it answers that (HTTP status, Graph error code). `before`
    (if set) runs in the server thread before a send is answered.
    """

    def __init__(self) -> None:
        self.errors: dict[str, tuple[int, int]] = {}
        self.before: Callable[[dict], None] | None = None
        self.requests: list[dict] = []
        self._counter = itertools.count(1)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length) or b"{}")
                stub.requests.append(payload)
                if stub.before is not None:
                    stub.before(payload)
                to = str(payload.get("to", ""))
                if to in stub.errors:
                    status, code = stub.errors[to]
                    answer = {
                        "error": {
                            "message": f"error {code}",
                            "type": "OAuthException",
                            "code": code,
                            "fbtrace_id": "AbCdEf",
                        }
                    }
                else:
                    status = 200
                    wamid = f"wamid.STUB{next(stub._counter):010d}"
                    answer = {
                        "messaging_product": "whatsapp",
                        "contacts": [{"input": to, "wa_id": to}],
                        "messages": [{"id": wamid}],
                    }
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def fail(self, phone: str, code: int, status: int = 400) -> None:
        self.errors[phone.lstrip("+")] = (status, code)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def meta_provider_config(stub: GraphStub) -> dict:
    return {
        "provider": {
            "kind": "meta",
            "base_url": stub.url,
            "token": "test-token",
            "phone_number_id": "106540352242922",
            "template_name": "campagne",
        }
    }
