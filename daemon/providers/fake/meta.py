"""The fake provider's Meta dialect: the WhatsApp Cloud API's wire shapes.

What changes from the Wassenger dialect is the wire alone; the state, the
faults, the timing of statuses and replies (core.py) are the same.

API (what campaignd's Meta client uses), Bearer token required:
  POST /{version}/{phone_number_id}/messages   a template or a text; 200
       {"messaging_product", "contacts": [{"input", "wa_id"}],
        "messages": [{"id": "wamid...", "message_status"?}]}; never deduped
  GET  /{version}/{phone_number_id}?fields=    the phone number object
Errors as the Graph API gives them: {"error": {"message", "type":
"OAuthException", "code", "error_data"?, "fbtrace_id"}}, 401 code 190 for a
bad token, 400 code 100 for a bad parameter, 404 code 132001 for a template
that is not among ``templates``, 400 code 132000 for a wrong number of body
parameters.

Numbers are named as WhatsApp names them (``whatsapp_id``: a Mexican mobile
as 521...), in answers, statuses and replies.

As at Meta, a send is accepted whatever its recipient: a number not on
WhatsApp (``invalid_numbers``, ``invalid_suffix``) and a text outside the
24 h window the contact's last message opened get a 200 and then a
``failed`` status (131026, 131047), and reach no phone.

Webhooks: {"object": "whatsapp_business_account", "entry": [{"id",
"changes": [{"field": "messages", "value": {"messaging_product",
"metadata", "statuses" | "contacts" + "messages"}}]}]}, signed
``X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body>`` keyed with
``webhook_secret`` (campaignd's ``provider.app_secret``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from typing import Any
from typing import NamedTuple
from urllib.parse import parse_qs

from daemon.providers.fake.options import _PHONE_RE
from daemon.providers.fake.options import FakeOptions
from daemon.providers.fake.options import _digits
from daemon.providers.fake.options import template_counts

WINDOW_S = 86400.0  # a contact's message opens 24 h of free-form messages
_VERSION_RE = re.compile(r"^v\d+\.\d+$")
_MAX_TEXT = 4096
_MAX_CALLBACK = 512
_ERROR_CODES_URL = (
    "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
)

# The faults core.py injects, as the Graph API answers them: (HTTP, code, text).
FAULTS = {
    "down": (503, 2, "Service temporarily unavailable"),
    "unauthorized": (
        401,
        190,
        "Invalid OAuth access token - Cannot parse access token",
    ),
    "rate_limit": (400, 130429, "Rate limit hit"),
    "failure": (500, 131000, "Something went wrong"),
}
# Titles of the errors a failed status may carry.
STATUS_ERRORS = {
    131026: "Message undeliverable",
    131047: "Re-engagement message",
    131048: "Spam rate limit hit",
    131049: "This message was not delivered to maintain healthy ecosystem engagement",
    131050: "User stopped marketing messages",
    132015: "Template is paused",
    132016: "Template is disabled",
}
UNDELIVERABLE = 131026
OUTSIDE_WINDOW = 131047


class Send(NamedTuple):
    """A valid POST .../messages, as the fake keeps it."""

    to: str  # as given
    phone: str  # +<digits>
    type: str  # "template" or "text"
    text: str  # the text, or the template as "name(param, param)"
    template: dict | None  # {"name", "language", "parameters"}
    reference: str | None  # biz_opaque_callback_data


def error(status: int, code: int, text: str, details: str = "") -> tuple[int, dict]:
    """(HTTP status, body) of a Graph API error."""
    err: dict[str, Any] = {
        "message": text if code == 190 else f"(#{code}) {text}",
        "type": "OAuthException",
        "code": code,
    }
    if details:
        err["error_data"] = {"messaging_product": "whatsapp", "details": details}
    err["fbtrace_id"] = base64.b64encode(secrets.token_bytes(18)).decode()[:23]
    return status, {"error": err}


def fault(name: str) -> tuple[int, dict]:
    status, code, text = FAULTS[name]
    return error(status, code, text)


def authorized(headers: dict, token: str) -> bool:
    """A Bearer token, the configured one when set (any one otherwise)."""
    auth = headers.get("authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        return False
    return not token or auth == f"Bearer {token}"


def route(method: str, path: str, phone_number_id: str) -> str | tuple[int, dict]:
    """ "messages" or "phone" for a Graph API path; else the error to answer."""
    parts = path.strip("/").split("/")
    if not (2 <= len(parts) <= 3 and _VERSION_RE.match(parts[0])):
        return error(400, 2500, "Unknown path components", path)
    if len(parts) == 3 and parts[2] != "messages":
        return error(400, 2500, "Unknown path components", f"/{parts[2]}")
    wanted = ("POST" if len(parts) == 3 else "GET", parts[1])
    if (method, parts[1]) != (wanted[0], phone_number_id):
        return error(
            400,
            100,
            f"Unsupported {method.lower()} request. Object with ID '{parts[1]}'"
            " does not exist, cannot be loaded due to missing permissions, or"
            " does not support this operation",
        )
    return "messages" if len(parts) == 3 else "phone"


def phone_number(opts: FakeOptions, query: str) -> dict:
    """The phone number object, the ``fields`` asked for (and its id)."""
    known = {
        "display_phone_number": "+" + _digits(opts.device_phone),
        "verified_name": "Fake Provider",
        "quality_rating": "GREEN",
        "code_verification_status": "VERIFIED",
        "platform_type": "CLOUD_API",
        "throughput": {"level": "STANDARD"},
    }
    fields = (parse_qs(query).get("fields") or [""])[0]
    names = [f.strip() for f in fields.split(",") if f.strip()] or list(known)
    out = {name: known[name] for name in names if name in known}
    out["id"] = opts.phone_number_id
    return out


def _bad(details: str, text: str = "Invalid parameter") -> tuple[int, dict]:
    return error(400, 100, text, details)


def parse_send(body: bytes, opts: FakeOptions) -> Send | tuple[int, dict]:
    """The send in ``body``, or the error Meta answers to it."""
    try:
        data = json.loads(body)
    except ValueError:
        return _bad("the request body is not JSON")
    if not isinstance(data, dict):
        return _bad("the request body is not a JSON object")
    product = data.get("messaging_product")
    if product != "whatsapp":
        if product is None:
            return _bad("", "The parameter messaging_product is required.")
        return _bad(f"messaging_product must be whatsapp, got {product!r}")
    to = data.get("to")
    if to is None:
        return _bad("", "The parameter to is required.")
    if not isinstance(to, str) or not _PHONE_RE.match(to):
        return _bad(f"to: {to!r} is not a phone number")
    if data.get("recipient_type", "individual") != "individual":
        return _bad("recipient_type must be individual")
    ref = data.get("biz_opaque_callback_data")
    if ref is not None and (not isinstance(ref, str) or len(ref) > _MAX_CALLBACK):
        return _bad(f"biz_opaque_callback_data: a text of up to {_MAX_CALLBACK}")
    kind = data.get("type", "text")
    phone = "+" + _digits(to)
    if kind == "text":
        text = data.get("text")
        body_text = text.get("body") if isinstance(text, dict) else None
        if not isinstance(body_text, str) or not body_text:
            return _bad("", "The parameter text['body'] is required.")
        if len(body_text) > _MAX_TEXT:
            return _bad(f"text['body']: longer than {_MAX_TEXT} characters")
        return Send(to, phone, "text", body_text, None, ref or None)
    if kind == "template":
        template = _template(data.get("template"), opts)
        if isinstance(template, tuple):
            return template
        shown = f"{template['name']}({', '.join(template['parameters'])})"
        return Send(to, phone, "template", shown, template, ref or None)
    return _bad(f"type: {kind!r} is not supported here (template or text)")


def _template(obj: Any, opts: FakeOptions) -> dict | tuple[int, dict]:
    if not isinstance(obj, dict):
        return _bad("", "The parameter template is required.")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return _bad("", "The parameter template['name'] is required.")
    language = obj.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    if not isinstance(code, str) or not code:
        return _bad("", "The parameter template['language'] is required.")
    params: list[str] = []
    components = obj.get("components", [])
    if not isinstance(components, list):
        return _bad("template['components']: expected a list")
    for component in components:
        if not isinstance(component, dict) or component.get("type") not in (
            "header",
            "body",
            "button",
        ):
            return _bad("template['components']: a component of an unknown type")
        if component["type"] != "body":
            continue
        for param in component.get("parameters") or []:
            text = param.get("text") if isinstance(param, dict) else None
            if not isinstance(text, str) or not text or param.get("type") != "text":
                return error(
                    400, 131008, "Required parameter is missing", "a body parameter"
                )
            params.append(text)
    wanted = template_counts(opts.templates)
    if wanted and name not in wanted:
        return error(
            404,
            132001,
            "Template name does not exist in the translation",
            f"template name ({name}) does not exist in {code}",
        )
    count = wanted.get(name)
    if count is not None and count != len(params):
        return error(
            400,
            132000,
            "Number of parameters does not match the expected number of params",
            f"body: number of localizable_params ({len(params)}) does not match"
            f" the expected number of params ({count})",
        )
    return {"name": name, "language": code, "parameters": params}


def whatsapp_id(digits: str) -> str:
    """The id WhatsApp gives a number, as Meta's answers and webhooks carry
    it: a Mexican mobile keeps the "1" that E.164 dropped (521 + 10 digits
    for +52 + 10), so the sender of its replies is not the number sent to."""
    if digits.startswith("52") and len(digits) == 12:
        return f"521{digits[2:]}"
    return digits


def send_answer(send: Send, wamid: str) -> dict:
    message: dict[str, str] = {"id": wamid}
    if send.type == "template":
        message["message_status"] = "accepted"
    return {
        "messaging_product": "whatsapp",
        "contacts": [{"input": send.to, "wa_id": whatsapp_id(send.phone[1:])}],
        "messages": [message],
    }


def wamid(digits: str, unique: str) -> str:
    """A WhatsApp message id: "wamid." and base64, as Meta's look."""
    raw = f"HBgL{digits}FQIAERgS{unique}AA==".encode()
    return "wamid." + base64.b64encode(raw).decode()


def _envelope(opts: FakeOptions, value: dict) -> dict:
    metadata = {
        "display_phone_number": _digits(opts.device_phone),
        "phone_number_id": opts.phone_number_id,
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": opts.business_account_id,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": metadata,
                            **value,
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }


def status_payload(
    opts: FakeOptions, message: dict, status: str, at: float, code: int = 0
) -> dict:
    """A statuses[] webhook: sent, delivered, read, or failed with ``code``."""
    digits = whatsapp_id(message["phone"][1:])
    item: dict[str, Any] = {
        "id": message["id"],
        "status": status,
        "timestamp": str(int(at)),
        "recipient_id": digits,
    }
    if message["reference"]:
        item["biz_opaque_callback_data"] = message["reference"]
    if status in ("sent", "delivered"):
        category = "marketing" if message.get("type") == "template" else "service"
        conversation: dict[str, Any] = {
            "id": hashlib.md5(f"{digits}:{category}".encode()).hexdigest(),
            "origin": {"type": category},
        }
        if status == "sent":
            conversation["expiration_timestamp"] = str(int(at + WINDOW_S))
        item["conversation"] = conversation
        item["pricing"] = {
            "billable": True,
            "pricing_model": "CBP",
            "category": category,
        }
    if status == "failed":
        title = STATUS_ERRORS.get(code, "Message failed to send")
        item["errors"] = [
            {
                "code": code,
                "title": title,
                "message": title,
                "error_data": {"details": title},
                "href": _ERROR_CODES_URL,
            }
        ]
    return _envelope(opts, {"statuses": [item]})


def reply_payload(
    opts: FakeOptions, message: dict, text: str, at: float, msg_id: str
) -> dict:
    """A messages[] webhook: the contact of ``message`` answers ``text`` to it."""
    digits = whatsapp_id(message["phone"][1:])
    return _envelope(
        opts,
        {
            "contacts": [
                {"profile": {"name": f"Contact {digits[-4:]}"}, "wa_id": digits}
            ],
            "messages": [
                {
                    "context": {
                        "from": _digits(opts.device_phone),
                        "id": message["id"],
                    },
                    "from": digits,
                    "id": msg_id,
                    "timestamp": str(int(at)),
                    "text": {"body": text},
                    "type": "text",
                }
            ],
        },
    )
