"""Wassenger: the REST client and the webhook parser.

API shapes and their sources are in docs/reference providers.md, sections A-B:
``POST /v1/messages`` with a ``Token`` header, ``GET /v1/numbers/exists``,
``GET /v1/devices``; webhooks are ``{id, object, event, created, device, data}``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from daemon.config import ProviderConfig
from daemon.providers.base import ACK_STATUS
from daemon.providers.base import CREDENTIALS_HINT
from daemon.providers.base import CREDENTIALS_REFUSED
from daemon.providers.base import IgnoredEvent
from daemon.providers.base import InboundMessage
from daemon.providers.base import NumberCheck
from daemon.providers.base import PauseCampaignError
from daemon.providers.base import PermanentError
from daemon.providers.base import ProviderError
from daemon.providers.base import ProviderEvent
from daemon.providers.base import RetryableError
from daemon.providers.base import SendResult
from daemon.providers.base import StatusUpdate
from daemon.providers.base import as_dict
from daemon.providers.base import as_e164
from daemon.providers.base import as_epoch
from daemon.providers.base import as_text
from daemon.providers.base import clean_event
from daemon.providers.base import error_text
from daemon.providers.base import parse_retry_after
from daemon.providers.base import unknown_key
from daemon.providers.http import HttpClient
from daemon.providers.http import Response

# Outbound events and the status each implies when data.ack is absent.
_OUT_EVENTS = {
    "message:out:new": "sent",
    "message:out:sent": "sent",
    "message:out:ack": None,  # the ack says it all
    "message:out:delivered": "delivered",
    "message:out:read": "read",
    "message:out:failed": "failed",
}


class WassengerProvider:
    """Wassenger REST client; safe to share between threads."""

    supports_number_check = True

    def __init__(self, cfg: ProviderConfig) -> None:
        self._cfg = cfg
        base_url = cfg.base_url.rstrip("/")
        if base_url.endswith("/v1"):
            # A copied "https://api.wassenger.com/v1" would make every path
            # /v1/v1/..., and the 404s would read as "number not on WhatsApp".
            base_url = base_url[: -len("/v1")]
        self._http = HttpClient(
            base_url,
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.timeout_s,
            headers={
                "Token": cfg.token,
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "campaignd",
            },
        )

    def send(
        self,
        phone: str,
        body: str,
        reference: str,
        *,
        kind: int = 1,
        variables: dict[str, str] | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> SendResult:
        """POST /v1/messages; Wassenger always gets the rendered text."""
        payload: dict[str, Any] = {"phone": phone, "message": body}
        if self._cfg.device:
            payload["device"] = self._cfg.device
        if reference:
            payload["reference"] = reference
        resp = self._http.request(
            "POST", "/v1/messages", json.dumps(payload).encode(), on_write=on_write
        )
        if resp.status in (200, 201):
            # A 2xx means accepted: never resend it, even without an id
            # (status webhooks still match on our reference).
            data = as_dict(resp.json())
            return SendResult(
                provider_id=as_text(data.get("id")) or "",
                wa_id=as_text(data.get("waId")),
                raw_status=as_text(data.get("status")) or "accepted",
            )
        raise _error(resp, "send")

    def check_number(self, phone: str) -> NumberCheck:
        """GET /v1/numbers/exists: 200 reads ``exists``, 404 means not on WhatsApp."""
        query = urllib.parse.urlencode({"phone": phone})
        resp = self._http.request(
            "GET", f"/v1/numbers/exists?{query}", timeout=self._cfg.check_timeout_s
        )
        if resp.status == 200:
            exists = as_dict(resp.json()).get("exists", True)
            return NumberCheck(phone=phone, exists=exists is True)
        if resp.status == 404:
            return NumberCheck(phone=phone, exists=False)
        raise _error(resp, "number check")

    def device_status(self) -> dict:
        """{"ok", "detail"}: ok when the device session is online; never raises."""
        device = self._cfg.device
        path = f"/v1/devices/{urllib.parse.quote(device)}" if device else "/v1/devices"
        try:
            resp = self._http.request("GET", path)
        except ProviderError as exc:
            return {"ok": False, "detail": exc.reason}
        if resp.status != 200:
            return {"ok": False, "detail": _error(resp, "device status").reason}
        data = resp.json()
        devices = data if isinstance(data, list) else [data]
        described = []
        for dev in devices:
            dev = as_dict(dev)
            session = as_text(as_dict(dev.get("session")).get("status")) or "unknown"
            name = as_text(dev.get("alias")) or as_text(dev.get("phone"))
            name = name or as_text(dev.get("id")) or "?"
            if session == "online":
                return {"ok": True, "detail": f"device {name} online"}
            described.append(f"device {name} session {session}")
        return {"ok": False, "detail": "; ".join(described) or "no device"}

    def close(self) -> None:
        self._http.close()


def _error(resp: Response, what: str) -> ProviderError:
    """The exception for a non-2xx answer, with a readable reason.

    4xx (bad phone 400, 404, conflict 409...) cannot get better by trying
    again, except 408 and 429; 5xx and the rest can. A refused token (401,
    403) pauses the campaign: CREDENTIALS_REFUSED.
    """
    data = resp.json()
    message: str | None = None
    code: str | int | None = None
    if isinstance(data, dict):
        # Wassenger errors: {"error": "<code or text>", "message": "<text>"}.
        msg, msg_code = error_text(data.get("message"))
        err, err_code = error_text(data.get("error"))
        message = f"{msg} ({err})" if msg and err and err != msg else msg or err
        code = data.get("code")
        if not isinstance(code, (int, str)) or isinstance(code, bool):
            code = err_code if err_code is not None else err or msg_code
    if message is None:
        message = resp.body[:200].decode("utf-8", "replace").strip() or "no details"
    reason = f"{what}: HTTP {resp.status}: {message}"
    status = resp.status
    if status in (408, 429) or status >= 500:
        return RetryableError(
            reason,
            http_status=status,
            code=code,
            retry_after=parse_retry_after(resp.headers.get("retry-after")),
        )
    if status in CREDENTIALS_REFUSED:
        reason = f"{reason} ({CREDENTIALS_HINT})"
        return PauseCampaignError(reason, http_status=status, code=code)
    if 400 <= status < 500:
        return PermanentError(reason, http_status=status, code=code)
    # 1xx/3xx: not an API answer (a proxy or captive portal); try again later.
    return RetryableError(reason, http_status=status, code=code)


class WassengerWebhookParser:
    """Wassenger webhooks: one event per POST."""

    def split(self, body: Any) -> list[tuple[str, dict]]:
        """One item, keyed ``event:data.id:data.ack`` (deliveries repeat)."""
        item = body if isinstance(body, dict) else {"_raw": body}
        event = as_text(item.get("event"))
        data = as_dict(item.get("data"))
        msg_id = as_text(data.get("id")) or as_text(item.get("id"))
        if event is None or msg_id is None:
            return [(unknown_key(item), item)]
        ack = as_text(data.get("ack")) or ""
        return [(f"{event}:{msg_id}:{ack}", item)]

    def parse(self, item: dict) -> ProviderEvent:
        """The event for one item; odd shapes give IgnoredEvent, never an error.

        Every text field is storable (no NUL, no lone surrogate): clean_event.
        """
        try:
            return clean_event(self._parse(as_dict(item)))
        except Exception as exc:  # noqa: BLE001 - a webhook must never crash us
            return clean_event(IgnoredEvent(f"unparsable wassenger event: {exc!r}"))

    def _parse(self, item: dict) -> ProviderEvent:
        event = as_text(item.get("event"))
        data = as_dict(item.get("data"))
        if event is None:
            return IgnoredEvent("no event name")
        if not data:
            return IgnoredEvent(f"{event}: no data object")
        if event == "message:in:new":
            return _inbound(item, data)
        if event in _OUT_EVENTS:
            return _status(event, item, data)
        return IgnoredEvent(f"event {event} not handled")


def _inbound(item: dict, data: dict) -> ProviderEvent:
    chat = as_dict(data.get("chat"))
    sender = as_text(data.get("from")) or ""
    phone = (
        as_e164(data.get("fromNumber"))
        or as_e164(as_dict(chat.get("contact")).get("phone"))
        or (as_e164(sender) if sender.endswith("@c.us") else None)
    )
    chat_type = as_text(chat.get("type"))
    is_group = (
        (chat_type is not None and chat_type != "chat")
        or as_dict(data.get("meta")).get("isGroup") is True
        or sender.endswith("@g.us")
    )
    if phone is None:
        return IgnoredEvent("message:in:new without a sender phone")
    body = data.get("body")
    if not isinstance(body, str):
        caption = as_dict(data.get("media")).get("caption")
        body = caption if isinstance(caption, str) else ""
    return InboundMessage(
        from_phone=phone,
        body=body,
        provider_message_id=as_text(data.get("id")) or as_text(item.get("id")) or "",
        timestamp=_timestamp(item, data),
        is_group=is_group,
    )


def _status(event: str, item: dict, data: dict) -> ProviderEvent:
    ack = as_text(data.get("ack"))
    if event == "message:out:failed":
        status = "failed"
    elif ack is not None:
        status = ACK_STATUS.get(ack.lower(), "")
        if not status:
            # "pending"/"queued": not on WhatsApp yet, nothing to record.
            return IgnoredEvent(f"{event}: ack {ack!r} is not a delivery status")
    else:
        status = _OUT_EVENTS[event] or ""
        if not status:
            return IgnoredEvent(f"{event} without an ack")
    error, code = error_text(data.get("error"))
    if code is None:
        code = data.get("errorCode") if isinstance(data.get("errorCode"), int) else None
    msg_id = as_text(data.get("id"))
    return StatusUpdate(
        status=status,
        reference=as_text(data.get("reference")),
        provider_message_id=msg_id,
        # data.id on outbound events is believed to be the WhatsApp id (the
        # send response's waId); providers.md B.3 flags this as inferred.
        wa_id=as_text(data.get("waId")) or msg_id,
        error=error if status == "failed" else None,
        error_code=code if status == "failed" else None,
        timestamp=_timestamp(item, data),
    )


def _timestamp(item: dict, data: dict) -> float:
    for value in (data.get("timestamp"), data.get("date"), item.get("created")):
        seconds = as_epoch(value)
        if seconds is not None:
            return seconds
    # No usable time at all: "now" is the least wrong for the 24 h window.
    return time.time()
