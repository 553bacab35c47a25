"""The fake provider's Wassenger dialect: the wire shapes of its webhooks
and devices (the requests are answered in core.py, its first dialect)."""

from __future__ import annotations

from daemon.providers.fake.options import FakeOptions
from daemon.providers.fake.options import _iso


def device_ref(opts: FakeOptions) -> dict:
    return {
        "id": opts.device_id,
        "phone": opts.device_phone,
        "alias": "fake-provider",
        "plan": "io-professional",
    }


def device(opts: FakeOptions, device_id: str | None) -> dict:
    return {
        **device_ref(opts),
        "id": device_id or opts.device_id,
        "status": "operative",
        "session": {"status": opts.session_status},
        "billing": {"subscription": {"product": "io"}},
    }


def ack_payload(opts: FakeOptions, message: dict, ack: str, at: float) -> dict:
    """A message:out:ack webhook of ``message``."""
    phone = message["phone"]
    return {
        "id": message["waId"],
        "object": "message",
        "event": "message:out:ack",
        "created": int(at),
        "device": device_ref(opts),
        "data": {
            "id": message["waId"],
            "type": "text",
            "flow": "outbound",
            "ack": ack,
            "from": opts.device_phone.lstrip("+") + "@c.us",
            "fromNumber": opts.device_phone,
            "to": phone.lstrip("+") + "@c.us",
            "toNumber": phone,
            "body": message["message"],
            "reference": message["reference"],
            "date": _iso(at),
            "timestamp": int(at),
        },
    }


def inbound_payload(
    opts: FakeOptions, phone: str, text: str, at: float, msg_id: str
) -> dict:
    """A message:in:new webhook: ``phone`` writes ``text``."""
    wid = phone.lstrip("+") + "@c.us"
    return {
        "id": msg_id,
        "object": "message",
        "event": "message:in:new",
        "created": int(at),
        "device": device_ref(opts),
        "data": {
            "id": msg_id,
            "type": "text",
            "flow": "inbound",
            "status": "active",
            "ack": "delivered",
            "from": wid,
            "fromNumber": phone,
            "to": opts.device_phone.lstrip("+") + "@c.us",
            "toNumber": opts.device_phone,
            "date": _iso(at),
            "timestamp": int(at),
            "body": text,
            "chat": {
                "id": wid,
                "name": phone,
                "type": "chat",
                "contact": {"wid": wid, "type": "user", "phone": phone},
            },
            "events": {},
            "meta": {"isGroup": False, "isForwarded": False, "source": "fake"},
        },
    }
