"""Meta WhatsApp Cloud API: the Graph API client and the webhook parser.

Shapes and the error-code table come from providers.md section C.

Message 1 goes to cold contacts, so on Meta it must be an approved template
(``template_name`` / ``template_language``). Its body parameters are the
values of ``variables``: keys made only of digits first, by number ("1",
"2", "10"), then the other keys in the order given. So a template ``Bonjour
{{1}}, ... {{2}}`` is fed by variables {"1": ..., "2": ...}. The caller
passes the contact's number-named variables and those the campaign's
Message 1 text uses, in the order they appear in it
(campaigns.template_parameter_values): a template written like the text
reads the same; Meta refuses a template given more parameters than it has
(132000). Message 2 is
sent inside the 24 h window opened by the reply, so it is free text.
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
from daemon.providers.base import KIND_FIRST
from daemon.providers.base import IgnoredEvent
from daemon.providers.base import InboundMessage
from daemon.providers.base import NumberCheck
from daemon.providers.base import PauseCampaignError
from daemon.providers.base import PermanentError
from daemon.providers.base import ProviderError
from daemon.providers.base import ProviderEvent
from daemon.providers.base import RecipientOptedOutError
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

# Graph API error codes -> what to do (providers.md C.5, plus Meta's generic
# temporary codes 1, 2, 4, 131000, 131016, 133004).
_RETRY_CODES = frozenset({1, 2, 4, 80007, 130429, 131000, 131016, 131056, 133004})
_PERMANENT_CODES = frozenset({131026, 131047})
# Codes that mean more than "this message failed", whether they come back
# from a send or in a status webhook: the one table for both.
# 131050: the recipient stopped marketing messages -> opt them out.
# 131048 spam limit, 132015 template paused, 132016 template disabled: every
# send of the campaign fails -> pause it.
CAMPAIGN_ACTIONS = {
    131050: "opt_out",
    131048: "pause",
    132015: "pause",
    132016: "pause",
}
_OPTED_OUT_CODES = frozenset(c for c, a in CAMPAIGN_ACTIONS.items() if a == "opt_out")
_PAUSE_CODES = frozenset(c for c, a in CAMPAIGN_ACTIONS.items() if a == "pause")
# OAuthException: the access token is invalid or expired (HTTP 401).
_TOKEN_CODE = 190
# Per-user marketing cap: retry no earlier than 24 h later.
_MARKETING_CAP_CODE = 131049
_DAY_S = 86400.0


def template_parameters(variables: dict[str, str]) -> list[str]:
    """Template body parameter values, in the order documented above."""

    numbered = sorted((key for key in variables if key.isdigit()), key=int)
    named = [key for key in variables if not key.isdigit()]
    return [str(variables[key]) for key in numbered + named]


class MetaProvider:
    """WhatsApp Cloud API client; safe to share between threads."""

    # The Cloud API cannot tell whether a number is on WhatsApp before a send.
    supports_number_check = False

    def __init__(self, cfg: ProviderConfig) -> None:
        self._cfg = cfg
        self._base = f"/{cfg.api_version}/{urllib.parse.quote(cfg.phone_number_id)}"
        self._http = HttpClient(
            cfg.base_url,
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.timeout_s,
            headers={
                "Authorization": f"Bearer {cfg.token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "campaignd",
            },
        )

    def message_payload(
        self, phone: str, body: str, reference: str, kind: int, variables: dict
    ) -> dict[str, Any]:
        """The JSON body of a send: a template for Message 1, text otherwise."""
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": phone.lstrip("+"),
        }
        if kind == KIND_FIRST:
            if not self._cfg.template_name:
                raise PauseCampaignError(
                    "provider.template_name is empty: Meta needs a template"
                    " for Message 1"
                )
            template: dict[str, Any] = {
                "name": self._cfg.template_name,
                "language": {
                    "code": self._cfg.template_language,
                    "policy": "deterministic",
                },
            }
            params = template_parameters(variables)
            if params:
                template["components"] = [
                    {
                        "type": "body",
                        "parameters": [{"type": "text", "text": v} for v in params],
                    }
                ]
            payload["type"] = "template"
            payload["template"] = template
        else:
            payload["type"] = "text"
            payload["text"] = {"preview_url": False, "body": body}
        if reference:
            # Echoed in every status webhook of this message.
            payload["biz_opaque_callback_data"] = reference
        return payload

    def send(
        self,
        phone: str,
        body: str,
        reference: str,
        *,
        kind: int = KIND_FIRST,
        variables: dict[str, str] | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> SendResult:
        """POST /{version}/{phone_number_id}/messages."""
        payload = self.message_payload(phone, body, reference, kind, variables or {})
        resp = self._http.request(
            "POST",
            f"{self._base}/messages",
            json.dumps(payload).encode(),
            on_write=on_write,
        )
        if 200 <= resp.status < 300:
            data = as_dict(resp.json())
            messages = data.get("messages")
            first = (
                as_dict(messages[0]) if isinstance(messages, list) and messages else {}
            )
            wamid = as_text(first.get("id"))
            return SendResult(
                provider_id=wamid or "",
                wa_id=wamid,
                raw_status=as_text(first.get("message_status")) or "accepted",
            )
        raise _error(resp, "send")

    def check_number(self, phone: str) -> NumberCheck:
        """Always exists=True: Meta has no pre-check; bad numbers fail as 131026."""
        return NumberCheck(phone=phone, exists=True)

    def device_status(self) -> dict:
        """{"ok", "detail"}: ok when the phone number object answers 200."""
        path = f"{self._base}?fields=display_phone_number,quality_rating,verified_name"
        try:
            resp = self._http.request("GET", path)
        except ProviderError as exc:
            return {"ok": False, "detail": exc.reason}
        if resp.status != 200:
            return {"ok": False, "detail": _error(resp, "phone number").reason}
        data = as_dict(resp.json())
        number = as_text(data.get("display_phone_number")) or self._cfg.phone_number_id
        quality = as_text(data.get("quality_rating")) or "unknown"
        return {"ok": True, "detail": f"number {number} quality {quality}"}

    def close(self) -> None:
        self._http.close()


def _error(resp: Response, what: str) -> ProviderError:
    """Map a Graph API error: its code first, then the HTTP status."""
    err = as_dict(as_dict(resp.json()).get("error"))
    code = err.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = int(code) if isinstance(code, str) and code.isdigit() else None
    message, _ = error_text(err) if err else (None, None)
    if message is None:
        message = resp.body[:200].decode("utf-8", "replace").strip() or "no details"
    reason = f"{what}: HTTP {resp.status}: {_with_code(message, code)}"
    status = resp.status
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    if code in _OPTED_OUT_CODES:
        return RecipientOptedOutError(reason, http_status=status, code=code)
    if code in _PAUSE_CODES:
        return PauseCampaignError(reason, http_status=status, code=code)
    if code == _TOKEN_CODE or status in CREDENTIALS_REFUSED:
        reason = f"{reason} ({CREDENTIALS_HINT})"
        return PauseCampaignError(reason, http_status=status, code=code)
    if code in _PERMANENT_CODES:
        return PermanentError(reason, http_status=status, code=code)
    if code == _MARKETING_CAP_CODE:
        return RetryableError(
            reason,
            http_status=status,
            code=code,
            retry_after=max(retry_after or 0, _DAY_S),
        )
    if code in _RETRY_CODES or status in (408, 429) or status >= 500:
        return RetryableError(
            reason, http_status=status, code=code, retry_after=retry_after
        )
    if 400 <= status < 500:
        return PermanentError(reason, http_status=status, code=code)
    return RetryableError(reason, http_status=status, code=code)


class MetaWebhookParser:
    """Meta webhooks: one POST may batch many messages and statuses."""

    def split(self, body: Any) -> list[tuple[str, dict]]:
        """One item per message ("msg:<id>") and status ("status:<id>:<status>")."""
        items: list[tuple[str, dict]] = []
        if isinstance(body, dict):
            for entry in _dicts(body.get("entry")):
                for change in _dicts(entry.get("changes")):
                    items.extend(_change_items(change))
        if not items:
            item = body if isinstance(body, dict) else {"_raw": body}
            items.append((unknown_key(item), item))
        return items

    def parse(self, item: dict) -> ProviderEvent:
        """The event for one item; odd shapes give IgnoredEvent, never an error.

        Every text field is storable (no NUL, no lone surrogate): clean_event.
        """
        try:
            return clean_event(self._parse(as_dict(item)))
        except Exception as exc:  # noqa: BLE001 - a webhook must never crash us
            return clean_event(IgnoredEvent(f"unparsable meta event: {exc!r}"))

    def _parse(self, item: dict) -> ProviderEvent:
        if isinstance(item.get("message"), dict):
            return _inbound(item["message"])
        if isinstance(item.get("status"), dict):
            return _status(item["status"])
        if isinstance(item.get("errors"), list):
            first = as_dict(item["errors"][0]) if item["errors"] else {}
            message, code = error_text(first)
            message = _without_code(message or "", code)
            return IgnoredEvent(f"meta error notification ({code}): {message}")
        field = as_text(item.get("field"))
        if field is not None:
            return IgnoredEvent(f"meta field {field} not handled")
        return IgnoredEvent("not a meta messages/statuses item")


def _dicts(value: Any) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _change_items(change: dict) -> list[tuple[str, dict]]:
    """Items of one entry[].changes[] element, each carrying its metadata."""
    field = as_text(change.get("field")) or ""
    value = as_dict(change.get("value"))
    if field != "messages" or not value:
        item = {"field": field, "value": value}
        return [(unknown_key(item), item)]
    metadata = as_dict(value.get("metadata"))
    items: list[tuple[str, dict]] = []
    contacts = _dicts(value.get("contacts"))
    for message in _dicts(value.get("messages")):
        item = {"field": field, "metadata": metadata, "message": message}
        if contacts:
            item["contacts"] = contacts
        msg_id = as_text(message.get("id"))
        items.append((f"msg:{msg_id}" if msg_id else unknown_key(item), item))
    for status in _dicts(value.get("statuses")):
        item = {"field": field, "metadata": metadata, "status": status}
        st_id, word = as_text(status.get("id")), as_text(status.get("status"))
        key = f"status:{st_id}:{word}" if st_id and word else unknown_key(item)
        items.append((key, item))
    errors = value.get("errors")
    if isinstance(errors, list) and errors:
        item = {"field": field, "metadata": metadata, "errors": errors}
        items.append((unknown_key(item), item))
    if not items:
        item = {"field": field, "value": value}
        items.append((unknown_key(item), item))
    return items


_TEXT_PATHS = (
    ("text", "body"),
    ("button", "text"),
    ("interactive", "button_reply", "title"),
    ("interactive", "list_reply", "title"),
)


def _inbound(message: dict) -> ProviderEvent:
    phone = as_e164(message.get("from"))
    if phone is None:
        return IgnoredEvent("meta message without a sender")
    if as_text(message.get("type")) == "system":
        # WhatsApp speaking (the user changed number, their identity key
        # changed), not the contact answering: no Message 2 for it.
        what = as_text(as_dict(message.get("system")).get("type")) or "system"
        return IgnoredEvent(f"meta system message ({what})")
    body = ""
    for path in _TEXT_PATHS:
        node: Any = message
        for key in path:
            node = as_dict(node).get(key)
        if isinstance(node, str):
            body = node
            break
    return InboundMessage(
        from_phone=phone,
        body=body,
        provider_message_id=as_text(message.get("id")) or "",
        timestamp=_timestamp(message),
        # Cloud API groups put a group_id on messages; 1:1 chats have none.
        is_group=as_text(message.get("group_id")) is not None,
    )


def _status(status: dict) -> ProviderEvent:
    word = as_text(status.get("status"))
    mapped = ACK_STATUS.get(word.lower()) if word else None
    if mapped is None or word == "error":
        return IgnoredEvent(f"meta status {word!r} not tracked")
    error, code, reason = None, None, None
    errors = status.get("errors")
    if mapped == "failed" and isinstance(errors, list) and errors:
        error, code = error_text(errors[0])
        reason = _with_code(error, code) if error else None
    wamid = as_text(status.get("id"))
    return StatusUpdate(
        status=mapped,
        reference=as_text(status.get("biz_opaque_callback_data")),
        provider_message_id=wamid,
        wa_id=wamid,
        error=error,
        error_code=code,
        timestamp=_timestamp(status),
        campaign_action=CAMPAIGN_ACTIONS.get(_int_code(code)),
        failure_reason=reason,
    )


def _with_code(message: str, code) -> str:
    """An error's text naming Meta's code once, in front: "(132000) Number
    of parameters ...: <details>". The Graph API's answers start their
    message with the code ("(#132000) Number of ..."), its status webhooks
    do not (errors[].code apart from the title)."""
    if code is None:
        return message
    return f"({code}) {_without_code(message, code)}"


def _without_code(message: str, code) -> str:
    """`message` without the "(#<code>) " the Graph API starts it with."""
    prefix = f"(#{code})"
    if code is None or not message.startswith(prefix):
        return message
    return message[len(prefix) :].lstrip()


def _int_code(code) -> int | None:
    """Meta sends codes as numbers; a string of digits means the same."""
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and code.strip().isdigit():
        return int(code)
    return None


def _timestamp(obj: dict) -> float:
    seconds = as_epoch(obj.get("timestamp"))
    # No usable time: "now" is the least wrong for the 24 h window.
    return time.time() if seconds is None else seconds
