"""What every messaging provider offers: results, errors, webhook events.

Nothing here does I/O. ``wassenger.py`` and ``meta.py`` implement the two
protocols below (``Provider`` for outbound calls, ``WebhookParser`` for inbound
webhooks); the rest of campaignd only sees the types defined in this module.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import Protocol

from daemon.errors import DaemonError

# Message kinds passed to Provider.send.
KIND_FIRST = 1  # Message 1: cold contact (a template on Meta)
KIND_FOLLOW_UP = 2  # Message 2: free text, inside the 24 h window

# Provider delivery vocabularies -> our four statuses. Wassenger integrators
# disagree on the ack words (server/device vs sent), so all of them are here;
# Meta uses sent/delivered/read/failed (and maybe played for voice notes).
ACK_STATUS = {
    "server": "sent",
    "device": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "played": "read",
    "failed": "failed",
    "error": "failed",
}


@dataclass(frozen=True)
class SendResult:
    provider_id: str  # the provider's message id ("" if a 2xx gave none)
    wa_id: str | None  # the WhatsApp message id, when the provider returns it
    raw_status: str  # the provider's own word for the state ("queued", ...)


@dataclass(frozen=True)
class NumberCheck:
    phone: str
    exists: bool


class ProviderError(DaemonError):
    """A provider call failed; ``reason`` is one readable line."""

    def __init__(
        self,
        reason: str,
        *,
        http_status: int | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.code = code

    @property
    def refused(self) -> bool:
        """Nothing of this call can have reached WhatsApp: the provider
        answered 4xx, or no whole request left (no connection, a write cut
        short). A 5xx may come after the provider took it."""
        status = self.http_status
        return status is None or 400 <= status < 500


class RetryableError(ProviderError):
    """Try again later: timeouts, lost connections, 429, 5xx, rate-limit codes."""

    def __init__(
        self,
        reason: str,
        *,
        http_status: int | None = None,
        code: str | int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason, http_status=http_status, code=code)
        self.retry_after = retry_after

    @property
    def label(self) -> str:
        """A short, bounded label for the retries metric: the HTTP status when
        there is one, else what the transport said (a timeout, a connection
        failure)."""
        status = self.http_status
        if status == 429:
            return "http_429"
        if status is not None and 500 <= status <= 599:
            return "http_5xx"
        if status == 408:
            return "timeout"
        if status is not None:
            return "other"
        lowered = self.reason.lower()
        if "timed out" in lowered or "timeout" in lowered:
            return "timeout"
        if "connect" in lowered:
            return "connection"
        return "other"


class UnconfirmedError(RetryableError):
    """The request was written whole and no answer came (read timeout, reset,
    EOF): the provider may have taken it. A send must not be repeated on
    this alone; other calls (number checks) may treat it as retryable."""

    refused = False


class PermanentError(ProviderError):
    """Sending this message again cannot succeed (bad number, bad auth...)."""


class RecipientOptedOutError(PermanentError):
    """The recipient refuses this kind of message (Meta 131050): suppress them."""


class PauseCampaignError(PermanentError):
    """Every further send of the campaign would fail too (spam limit, template)."""


# HTTP statuses by which a provider refuses our credentials (a wrong or
# expired provider.token, a revoked permission): every send of every campaign
# would fail alike, and none is the contact's fault. The campaign pauses
# (its rows stay queued) instead of failing each member; the health check's
# provider part alerts; after the token is fixed, `campaign resume`.
CREDENTIALS_REFUSED = frozenset({401, 403})
CREDENTIALS_HINT = "the provider refused provider.token"


class Provider(Protocol):
    """An outbound provider client, shared by several worker threads."""

    def send(
        self,
        phone: str,
        body: str,
        reference: str,
        *,
        kind: int,
        variables: dict[str, str],
        on_write: Callable[[], None] | None = None,
    ) -> SendResult:
        """Send one message. `on_write()` must be called right before the
        request's first byte can leave (after connecting), and again before
        any write of it again: the caller notes the send as possibly on the
        wire there (runtime.InFlight), so a death before it re-sends the row
        at once and a death after it waits for evidence."""
        ...

    def check_number(self, phone: str) -> NumberCheck: ...

    def device_status(self) -> dict: ...

    def close(self) -> None: ...


# --- webhook events ---------------------------------------------------------


@dataclass(frozen=True)
class InboundMessage:
    from_phone: str  # E.164 with a leading +
    body: str
    provider_message_id: str
    timestamp: float  # epoch seconds
    is_group: bool


@dataclass(frozen=True)
class StatusUpdate:
    status: str  # "sent" | "delivered" | "read" | "failed"
    reference: str | None  # our idempotency key, echoed by the provider
    provider_message_id: str | None
    wa_id: str | None
    error: str | None
    error_code: int | str | None
    timestamp: float
    # What the failure means for the campaign beyond this message, decided by
    # the provider's own code table: "opt_out" (the recipient refuses us) or
    # "pause" (every send of the campaign would fail), else None.
    campaign_action: str | None = None
    # A failure as the row records it, when the provider's parser words it
    # otherwise than `error` (Meta: its code named in front); None: `error`.
    failure_reason: str | None = None


@dataclass(frozen=True)
class IgnoredEvent:
    reason: str


ProviderEvent = InboundMessage | StatusUpdate | IgnoredEvent


class WebhookParser(Protocol):
    """Turns raw webhook JSON into events; pure, and never raises on shapes."""

    def split(self, body: Any) -> list[tuple[str, dict]]: ...

    def parse(self, item: dict) -> ProviderEvent: ...


# Every code point of the surrogate range. json.loads pairs valid escapes into
# one astral character, so any surrogate left in a str is unpaired.
_SURROGATES = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """`text` as both databases can store it: NULs dropped (PostgreSQL refuses
    them in text) and unpaired surrogates as U+FFFD (SQLite cannot encode them).
    """
    if "\x00" in text:
        text = text.replace("\x00", "")
    if text.isascii():
        return text
    return _SURROGATES.sub("\ufffd", text)


def clean_event(event: ProviderEvent) -> ProviderEvent:
    """The event with every text field storable (see storable_text).

    Parsers return events through this: a reply holding a NUL or a lone
    surrogate must be processed like any other, not fail at every attempt.
    """
    changes = {}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if isinstance(value, str):
            cleaned = storable_text(value)
            if cleaned != value:
                changes[field.name] = cleaned
    return dataclasses.replace(event, **changes) if changes else event


# --- helpers shared by the providers ------------------------------------------


def verify_hmac_sha256(secret: str, raw_body: bytes, header_value: str | None) -> bool:
    """Check a ``sha256=<hex>`` signature of the exact raw body, in constant time."""
    if not secret or not header_value:
        return False
    scheme, sep, given = header_value.strip().partition("=")
    if not sep or scheme.strip().lower() != "sha256":
        return False
    expected = hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode())


def sign_hmac_sha256(secret: str, raw_body: bytes) -> str:
    """The ``sha256=<hex>`` header value that verify_hmac_sha256 accepts."""
    return "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def unknown_key(body: Any) -> str:
    """Dedupe key of a payload we cannot identify: a hash of its canonical JSON."""
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return "unknown:" + hashlib.sha256(canonical.encode()).hexdigest()


def as_dict(value: Any) -> dict:
    """``value`` if it is a dict, else an empty one (webhooks lie about shapes)."""
    return value if isinstance(value, dict) else {}


def as_text(value: Any) -> str | None:
    """A non-empty string from a str or a number, else None."""
    if type(value) is str:  # the usual case, tested first: every webhook has 4
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def as_epoch(value: Any) -> float | None:
    """Epoch seconds from a number, a numeric string or an ISO-8601 date."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            return _iso_epoch(value)
    else:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    # Some senders use milliseconds; no real event is dated after year 5000.
    return seconds / 1000.0 if seconds > 1e11 else seconds


def _iso_epoch(value: str) -> float | None:
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def as_e164(value: Any) -> str | None:
    """``+<digits>`` from "+33 6..", "336..", 336.. or a "336..@c.us" chat id."""
    text = as_text(value)
    if text is None:
        return None
    text = text.split("@", 1)[0]
    digits = "".join(ch for ch in text if ch.isdigit())
    if not 5 <= len(digits) <= 20:
        return None
    return "+" + digits


def error_text(value: Any) -> tuple[str | None, int | str | None]:
    """(message, code) from an error given as a string or as {message, code}."""
    if isinstance(value, dict):
        message = (
            as_text(value.get("message"))
            or as_text(value.get("title"))
            or as_text(value.get("error"))
        )
        details = as_text(as_dict(value.get("error_data")).get("details"))
        if details and details != message:
            message = f"{message}: {details}" if message else details
        code = value.get("code")
        if not isinstance(code, (int, str)) or isinstance(code, bool):
            code = None
        return message or json.dumps(value, default=str)[:200], code
    text = as_text(value)
    return text, None
