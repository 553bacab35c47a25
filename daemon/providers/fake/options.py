"""The fake provider's options, the ones a running fake may change, and the
rules it follows (who replies, what a reference and a phone mean)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class FakeOptions:
    # Whose API and webhooks it speaks: "wassenger" or "meta" (the WhatsApp
    # Cloud API: Graph API sends, signed whatsapp_business_account webhooks).
    dialect: str = "wassenger"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see FakeProvider.url)
    token: str = ""  # required Token header when set
    latency_ms: float = 0.0  # added to every /v1 answer
    latency_jitter_ms: float = 0.0  # plus uniform 0..jitter on each /v1 answer
    # Share of sends (POST /v1/messages) answered after slow_latency_ms instead:
    # slower than the client's timeout (provider.timeout_s, 15 s), the send is
    # accepted all the same.
    slow_share: float = 0.0
    slow_latency_ms: float = 20000.0
    fail_rate: float = 0.0  # share of /v1 calls answered 500 (nothing accepted)
    # Share of sends accepted but answered 500 anyway: the ambiguous case a
    # client must resend with the same reference.
    fail_after_accept_rate: float = 0.0
    rate_limit_rate: float = 0.0  # share of /v1 calls answered 429
    retry_after_s: int = 1  # Retry-After of those 429s
    down: bool = False  # every /v1 call answers 503
    # Wassenger and Meta do not dedupe: a repeated reference is a second
    # message. True: a repeated reference returns the original (200), sends none.
    dedupe: bool = False
    invalid_numbers: frozenset[str] = frozenset()
    invalid_suffix: str = "0000"  # numbers ending so are not on WhatsApp
    session_status: str = "online"  # device session status reported
    device_id: str = "65f0c0ffee0000000000fa4e"
    device_phone: str = "+15550000001"  # meta: display_phone_number
    # Meta only: the business phone number id in the Graph API path, the
    # WhatsApp Business Account id of the webhooks' entry[].id, and the
    # approved templates ("name" or "name:<number of body parameters>";
    # empty: any name, any parameters).
    phone_number_id: str = "106540352242922"
    business_account_id: str = "102290129340398"
    templates: tuple[str, ...] = ()
    # Meta only: a share of the sends to valid numbers whose status webhook
    # is "failed" with errors[{code: status_failure_code}] (131026
    # undeliverable, 131050 stopped marketing, 131048 spam limit, ...).
    status_failure_share: float = 0.0
    status_failure_code: int = 131026
    webhook_url: str = ""  # where acks and replies are posted ("" = nowhere)
    webhook_secret: str = ""  # sent as X-Webhook-Secret, and HMAC key
    webhook_retries: int = 3  # extra attempts after a failed delivery
    webhook_backoff_ms: float = 200.0  # first retry delay, doubled each time
    webhook_threads: int = 4
    ack_delays_ms: tuple[float, ...] = (50.0, 150.0, 300.0)  # sent/delivered/read
    status_delay_ms: float = 0.0  # added to every ack delay (statuses come late)
    status_loss_share: float = 0.0  # share of messages whose acks never come
    # A message that gets a reply: its acks are posted only once the reply
    # webhook was (delivered or given up), each ack delay counted from then.
    reply_before_status: bool = False
    reply_share: float = 0.0  # share of contacts who reply (see reply_plan)
    reply_delay_ms: float = 500.0
    reply_text: str = "Oui, ça m'intéresse"
    opt_out_share: float = 0.0  # share of repliers who answer "STOP"
    log_path: str = ""  # JSON line per request
    seed: int = 0  # seeds injected faults and reply_plan


# Options that POST /_fake/config (and FakeProvider.configure) may change.
RUNTIME_OPTIONS = frozenset(
    {
        "token",
        "latency_ms",
        "latency_jitter_ms",
        "slow_share",
        "slow_latency_ms",
        "fail_rate",
        "fail_after_accept_rate",
        "rate_limit_rate",
        "retry_after_s",
        "down",
        "dedupe",
        "invalid_numbers",
        "invalid_suffix",
        "session_status",
        "webhook_url",
        "webhook_secret",
        "ack_delays_ms",
        "status_delay_ms",
        "status_loss_share",
        "reply_before_status",
        "reply_share",
        "reply_delay_ms",
        "reply_text",
        "opt_out_share",
        "status_failure_share",
        "status_failure_code",
    }
)
_RATES = (
    "fail_rate",
    "fail_after_accept_rate",
    "rate_limit_rate",
    "reply_share",
    "slow_share",
    "status_loss_share",
    "status_failure_share",
)
# The kind of a message from its reference: campaignd's idempotency keys end
# in -m<kind> (cd-<campaign>-<contact>-m1); ":m1" and "_m1" are read too.
_KIND_RE = re.compile(r"(?:^|[-:_])(m\d+)$")
_ACKS = ("sent", "delivered", "read")
_PHONE_RE = re.compile(r"^\+?[1-9]\d{5,14}$")


def reply_plan(
    phone: str, *, seed: int, reply_share: float, opt_out_share: float
) -> str | None:
    """Say whether ``phone`` replies: "reply", "stop" or None, from its digits.

    The first 8 bytes of sha256("<seed>:<digits>") as a fraction of 2**64 say
    whether the contact replies (< reply_share); the next 8 whether that
    reply is "STOP" (< opt_out_share). Only the first message accepted for a
    phone gets a reply.
    """
    digits = "".join(ch for ch in phone if ch.isdigit())
    digest = hashlib.sha256(f"{seed}:{digits}".encode()).digest()
    if int.from_bytes(digest[:8], "big") / 2.0**64 >= reply_share:
        return None
    if int.from_bytes(digest[8:16], "big") / 2.0**64 < opt_out_share:
        return "stop"
    return "reply"


def checked_options(opts: FakeOptions) -> FakeOptions:
    """``opts`` normalised (digits-only invalid numbers), or ValueError."""
    for name in (*_RATES, "opt_out_share"):
        if not 0.0 <= getattr(opts, name) <= 1.0:
            raise ValueError(f"{name}: must be between 0 and 1")
    if opts.fail_rate + opts.rate_limit_rate > 1.0:
        raise ValueError("fail_rate + rate_limit_rate: must not exceed 1")
    for name in (
        "latency_ms",
        "latency_jitter_ms",
        "slow_latency_ms",
        "status_delay_ms",
        "reply_delay_ms",
        "webhook_backoff_ms",
    ):
        if getattr(opts, name) < 0:
            raise ValueError(f"{name}: must not be negative")
    if opts.retry_after_s < 0 or opts.webhook_retries < 0:
        raise ValueError("retry_after_s, webhook_retries: must not be negative")
    if any(d < 0 for d in opts.ack_delays_ms) or len(opts.ack_delays_ms) > 3:
        raise ValueError("ack_delays_ms: up to 3 non-negative delays")
    if opts.webhook_threads < 1:
        raise ValueError("webhook_threads: must be at least 1")
    if opts.dialect not in ("wassenger", "meta"):
        raise ValueError("dialect: expected wassenger or meta")
    if opts.dialect == "meta" and opts.dedupe:
        raise ValueError("dedupe: the meta dialect never dedupes (as Meta)")
    template_counts(opts.templates)
    numbers = frozenset(_digits(n) for n in opts.invalid_numbers)
    return dataclasses.replace(opts, invalid_numbers=numbers)


def template_counts(templates: tuple[str, ...]) -> dict[str, int | None]:
    """{name: number of body parameters, None when any} of ``templates``."""
    out: dict[str, int | None] = {}
    for entry in templates:
        name, sep, count = str(entry).partition(":")
        if not name or (sep and not count.isdigit()):
            raise ValueError(f"templates: expected name or name:N, got {entry!r}")
        out[name] = int(count) if sep else None
    return out


def _coerce(name: str, value: Any) -> Any:
    """A JSON value for option ``name`` converted to the option's type."""
    if name not in RUNTIME_OPTIONS:
        raise ValueError(f"{name}: not a runtime option")
    default = getattr(FakeOptions(), name)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number")
        return type(default)(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string")
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"{name}: expected a list")
    if isinstance(default, tuple):
        return tuple(float(v) for v in value)
    return frozenset(str(v) for v in value)


def _kind_of(reference: str | None) -> str:
    """The kind ("m1", "m2") of a reference ending in -m<kind>; else "other"."""
    match = _KIND_RE.search(reference or "")
    return match.group(1) if match else "other"


def _digits(phone: str) -> str:
    return "".join(ch for ch in str(phone) if ch.isdigit())


def _iso(epoch: float) -> str:
    when = datetime.fromtimestamp(epoch, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _options_json(opts: FakeOptions) -> dict:
    out = dataclasses.asdict(opts)
    out["invalid_numbers"] = sorted(opts.invalid_numbers)
    out["ack_delays_ms"] = list(opts.ack_delays_ms)
    out["templates"] = list(opts.templates)
    return out
