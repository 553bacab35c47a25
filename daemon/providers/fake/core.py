"""The fake provider's state and request handling, behind one lock."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import random
import threading
import time
from typing import Any
from typing import NamedTuple
from urllib.parse import parse_qs

from daemon.providers.fake import meta
from daemon.providers.fake import wassenger
from daemon.providers.fake.options import _ACKS
from daemon.providers.fake.options import _PHONE_RE
from daemon.providers.fake.options import FakeOptions
from daemon.providers.fake.options import _coerce
from daemon.providers.fake.options import _digits
from daemon.providers.fake.options import _iso
from daemon.providers.fake.options import _kind_of
from daemon.providers.fake.options import _options_json
from daemon.providers.fake.options import checked_options
from daemon.providers.fake.options import reply_plan
from daemon.providers.fake.webhooks import _Job
from daemon.providers.fake.webhooks import _Webhooks


class _Reply(NamedTuple):
    status: int
    body: bytes
    headers: str  # extra header lines, each ending in CRLF
    delay: float  # seconds before the answer is written


def _json_reply(status: int, obj: Any, headers: str = "", delay: float = 0.0) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), headers, delay)


def _error_reply(status: int, code: str, message: str, delay: float = 0.0) -> _Reply:
    return _json_reply(status, {"error": code, "message": message}, delay=delay)


def _authorized(headers: dict, token: str) -> bool:
    if headers.get("token") == token:
        return True
    auth = headers.get("authorization", "")
    return auth == token or auth == f"Bearer {token}"


# What the meta dialect keeps of a message beyond the Wassenger fields: its
# type, its template ({"name", "language", "parameters"}), and the error code
# of a message accepted but never delivered (its status is "failed").
_META_FIELDS = ("type", "template", "failed_code")


def _json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# Injected faults as the Wassenger dialect answers them (meta.FAULTS: Meta).
_FAULTS = {
    "down": (503, "unavailable", "fake provider is down"),
    "unauthorized": (401, "unauthorized", "invalid or missing API token"),
    "rate_limit": (429, "rate_limit", "too many requests"),
    "failure": (500, "internal_error", "injected failure"),
}


class _Core:
    """State and request handling; every public method is thread-safe."""

    def __init__(self, options: FakeOptions) -> None:
        self.options = checked_options(options)
        self._lock = threading.Lock()
        self._transports: set[asyncio.BaseTransport] = set()
        self._webhooks = _Webhooks(self, self.options.webhook_threads)
        self._log: Any = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._rng = random.Random(self.options.seed)
        self._ids = itertools.count(1)
        # Random, not seeded: ids must not repeat when the fake is restarted
        # under a daemon that still remembers the previous run's messages.
        self._id_prefix = os.urandom(4).hex()
        self._messages: list[dict] = []
        self._by_ref: dict[str, dict] = {}
        self._ref_count: dict[str, int] = {}
        self._replied: set[str] = set()
        # meta: when each phone last wrote (its 24 h window for free text).
        self._wrote_at: dict[str, float] = {}
        # What each phone was sent: {phone: {kind: n}} by reference kind
        # ("m1", "m2", "other") and {phone: {text: n}}, kept as sends come.
        self._by_kind: dict[str, dict[str, int]] = {}
        self._by_text: dict[str, dict[str, int]] = {}
        self._dup_phones: set[str] = set()  # got one kind ("m<n>") twice or more
        self._lost: set[str] = set()  # ids of messages whose acks never come
        self._stats = dict.fromkeys(
            (
                "requests",
                "sends_accepted",
                "slow_answers",
                "statuses_lost",
                "undeliverable",
                "duplicate_requests",
                "per_reference_max",
                "failures_500",
                "failures_after_accept",
                "failures_429",
                "failures_503",
                "unauthorized",
                "invalid_requests",
                "checks",
                "device_checks",
                "webhooks_sent",
                "webhooks_failed",
                "webhooks_retried",
                "acks_sent",
                "replies_sent",
                "opt_outs_sent",
                "connections_opened",
            ),
            0,
        )

    # --- lifecycle and control ------------------------------------------------

    def start(self) -> None:
        if self.options.log_path:
            self._log = open(self.options.log_path, "a", buffering=1, encoding="utf-8")
        self._webhooks.start()

    def stop(self) -> None:
        self._webhooks.stop()
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def configure(self, changes: dict[str, Any]) -> FakeOptions:
        """Apply runtime option changes; ValueError names a bad one."""
        values = {name: _coerce(name, value) for name, value in changes.items()}
        with self._lock:
            self.options = checked_options(dataclasses.replace(self.options, **values))
            return self.options

    def reset(self) -> None:
        """Forget messages, counters and pending webhooks (not connections)."""
        self._webhooks.clear()
        with self._lock:
            opened = self._stats["connections_opened"]
            self._reset_state()
            self._stats["connections_opened"] = opened

    def stats(self) -> dict[str, int]:
        with self._lock:
            stats = dict(self._stats)
            stats["connections_active"] = len(self._transports)
            stats["messages_stored"] = len(self._messages)
            stats["duplicates"] = len(self._dup_phones)
        stats["webhooks_pending"] = self._webhooks.pending()
        return stats

    def messages(self) -> list[dict]:
        """Accepted messages, oldest first; accepted_count is per reference."""
        with self._lock:
            return [
                {
                    "id": m["id"],
                    "waId": m["waId"],
                    "reference": m["reference"],
                    "phone": m["phone"],
                    "body": m["message"],
                    "message": m["message"],  # same text, as in the send response
                    "createdAt": m["createdAt"],
                    "accepted_count": self._ref_count.get(m["reference"], 1),
                    "kind": _kind_of(m["reference"]),
                    "statuses_lost": m["id"] in self._lost,
                    **{k: m[k] for k in _META_FIELDS if k in m},
                }
                for m in self._messages
            ]

    def phone_counts(self, by: str = "kind") -> dict[str, dict[str, int]]:
        """Messages accepted per phone: {phone: {"m1": n, "m2": n}}.

        ``by="kind"`` groups by the reference's ``-m<kind>`` suffix (campaignd's
        idempotency keys; "other" when there is none), ``by="text"`` by body.
        Every acceptance counts, dedupe off or on (a deduped repeat is none).
        """
        if by not in ("kind", "text"):
            raise ValueError(f"by: expected kind or text, got {by!r}")
        source = self._by_kind if by == "kind" else self._by_text
        with self._lock:
            return {phone: dict(counts) for phone, counts in source.items()}

    def duplicates(self) -> dict[str, dict[str, int]]:
        """Phones that got one kind ("m<n>") more than once: their kind counts."""
        with self._lock:
            return {
                phone: {k: n for k, n in self._by_kind[phone].items() if n > 1}
                for phone in sorted(self._dup_phones)
            }

    def count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def webhook_done(self, kind: str) -> None:
        with self._lock:
            self._stats["webhooks_sent"] += 1
            if kind == "reply":
                self._stats["replies_sent"] += 1
            elif kind == "stop":
                self._stats["replies_sent"] += 1
                self._stats["opt_outs_sent"] += 1
            else:
                self._stats["acks_sent"] += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self._lock:
            self._transports.add(transport)
            self._stats["connections_opened"] += 1

    def connection_lost(self, transport: asyncio.BaseTransport) -> None:
        with self._lock:
            self._transports.discard(transport)

    def abort_connections(self) -> None:
        with self._lock:
            transports = list(self._transports)
        for transport in transports:
            transport.abort()

    # --- requests ----------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict, body: bytes) -> _Reply:
        """Answer one request (called on the event loop thread)."""
        path, _, query = target.partition("?")
        if path.startswith("/_fake/"):
            return self._control(method, path, query, body)
        info: dict[str, Any] = {}
        with self._lock:
            self._stats["requests"] += 1
            reply = self._api(method, path, query, headers, body, info)
            if self._log is not None:
                record = {"ts": round(time.time(), 6), "method": method, "path": path}
                record["status"] = reply.status
                record.update(info)
                self._log.write(json.dumps(record) + "\n")
        return reply

    def _control(self, method: str, path: str, query: str, body: bytes) -> _Reply:
        """The /_fake/ routes: not counted, logged, faulted or authenticated."""
        if path == "/_fake/stats" and method == "GET":
            return _json_reply(200, self.stats())
        if path == "/_fake/messages" and method == "GET":
            return _json_reply(200, self.messages())
        if path == "/_fake/phones" and method == "GET":
            by = (parse_qs(query).get("by") or ["kind"])[0]
            try:
                return _json_reply(200, self.phone_counts(by))
            except ValueError as exc:
                return _error_reply(400, "invalid_query", str(exc))
        if path == "/_fake/reset" and method == "POST":
            self.reset()
            return _json_reply(200, {"ok": True})
        if path == "/_fake/config" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    changes = json.loads(body or b"{}")
                    if not isinstance(changes, dict):
                        raise ValueError("expected a JSON object")
                    self.configure(changes)
                except ValueError as exc:
                    return _error_reply(400, "invalid_config", str(exc))
            return _json_reply(200, _options_json(self.options))
        return _error_reply(404, "not_found", f"no route {method} {path}")

    def _api(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict,
        body: bytes,
        info: dict,
    ) -> _Reply:
        opts = self.options
        delay = self._latency(method, path)
        fault = self._fault(headers)
        if fault is not None:
            if opts.dialect == "meta":  # Meta's rate limit: a 400, no Retry-After
                return _json_reply(*meta.fault(fault), delay=delay)
            status, code, text = _FAULTS[fault]
            reply = _error_reply(status, code, text, delay)
            if fault == "rate_limit":
                retry_after = f"Retry-After: {opts.retry_after_s}\r\n"
                reply = reply._replace(headers=retry_after)
            return reply
        if opts.dialect == "meta":
            return self._meta_api(method, path, query, body, info, delay)
        if path == "/v1/messages":
            if method != "POST":
                return _error_reply(405, "method_not_allowed", "use POST", delay)
            return self._send(body, info, delay)
        if path == "/v1/numbers/exists":
            if method == "GET":
                phone = (parse_qs(query).get("phone") or [""])[0]
            elif method == "POST":
                phone = _json_object(body).get("phone", "")
            else:
                return _error_reply(405, "method_not_allowed", "use GET or POST", delay)
            return self._check(str(phone), info, delay)
        if path == "/v1/devices" or path.startswith("/v1/devices/"):
            if method != "GET":
                return _error_reply(405, "method_not_allowed", "use GET", delay)
            self._stats["device_checks"] += 1
            device_id = path[len("/v1/devices/") :] or None
            device = wassenger.device(opts, device_id)
            return _json_reply(200, device if device_id else [device], delay=delay)
        return _error_reply(404, "not_found", f"no route {method} {path}", delay)

    def _fault(self, headers: dict) -> str | None:
        """The fault this request meets (a _FAULTS key, counted), or None."""
        opts = self.options
        if opts.down:
            self._stats["failures_503"] += 1
            return "down"
        if opts.dialect == "meta":
            refused = not meta.authorized(headers, opts.token)
        else:
            refused = bool(opts.token) and not _authorized(headers, opts.token)
        if refused:
            self._stats["unauthorized"] += 1
            return "unauthorized"
        if opts.rate_limit_rate or opts.fail_rate:
            roll = self._rng.random()
            if roll < opts.rate_limit_rate:
                self._stats["failures_429"] += 1
                return "rate_limit"
            if roll < opts.rate_limit_rate + opts.fail_rate:
                self._stats["failures_500"] += 1
                return "failure"
        return None

    def _latency(self, method: str, path: str) -> float:
        """Seconds before this answer: latency, jitter, or a slow send."""
        opts = self.options
        delay = opts.latency_ms / 1000.0
        if opts.latency_jitter_ms:
            delay += self._rng.uniform(0.0, opts.latency_jitter_ms) / 1000.0
        if opts.slow_share and method == "POST" and path.endswith("/messages"):
            if self._rng.random() < opts.slow_share:
                self._stats["slow_answers"] += 1
                delay = opts.slow_latency_ms / 1000.0
        return delay

    def _send(self, body: bytes, info: dict, delay: float) -> _Reply:
        opts = self.options
        data = _json_object(body)
        phone, text, ref = data.get("phone"), data.get("message"), data.get("reference")
        info["phone"], info["reference"] = phone, ref
        if not isinstance(phone, str) or not _PHONE_RE.match(phone):
            self._stats["invalid_requests"] += 1
            return _error_reply(400, "invalid_phone", f"invalid phone {phone!r}", delay)
        if not isinstance(text, str) or not text:
            self._stats["invalid_requests"] += 1
            return _error_reply(400, "invalid_message", "message is required", delay)
        if ref is not None and not isinstance(ref, str):
            self._stats["invalid_requests"] += 1
            return _error_reply(
                400, "invalid_reference", "reference must be text", delay
            )
        if ref and ref in self._by_ref:
            self._stats["duplicate_requests"] += 1
            if opts.dedupe:
                info["duplicate"] = True
                return _json_reply(200, self._by_ref[ref], delay=delay)
        if not self._exists(phone):
            self._stats["invalid_requests"] += 1
            return _error_reply(
                400, "invalid_phone", "phone number is not on WhatsApp", delay
            )
        message = self._accept(phone, text, ref or None)
        info["id"] = message["id"]
        rate = opts.fail_after_accept_rate
        if rate and self._rng.random() < rate:
            self._stats["failures_after_accept"] += 1
            return _error_reply(500, "internal_error", "injected failure", delay)
        return _json_reply(201, message, delay=delay)

    def _meta_api(
        self, method: str, path: str, query: str, body: bytes, info: dict, delay
    ) -> _Reply:
        """The Graph API routes of the meta dialect (see meta.py)."""
        opts = self.options
        found = meta.route(method, path, opts.phone_number_id)
        if isinstance(found, tuple):
            return _json_reply(*found, delay=delay)
        if found == "phone":
            self._stats["device_checks"] += 1
            return _json_reply(200, meta.phone_number(opts, query), delay=delay)
        send = meta.parse_send(body, opts)
        if not isinstance(send, meta.Send):
            self._stats["invalid_requests"] += 1
            return _json_reply(*send, delay=delay)
        info["phone"], info["reference"] = send.phone, send.reference
        if send.reference and send.reference in self._by_ref:
            self._stats["duplicate_requests"] += 1  # sent again: Meta never dedupes
        failed_code = 0
        if not self._exists(send.phone):
            failed_code = meta.UNDELIVERABLE
        elif send.type == "text" and not (
            time.time() - self._wrote_at.get(send.phone, -meta.WINDOW_S) < meta.WINDOW_S
        ):
            failed_code = meta.OUTSIDE_WINDOW
        elif opts.status_failure_share and (
            self._rng.random() < opts.status_failure_share
        ):
            failed_code = opts.status_failure_code
        extra = {"type": send.type, "template": send.template}
        if failed_code:
            extra["failed_code"] = failed_code
        message = self._accept(send.phone, send.text, send.reference, extra)
        info["id"] = message["id"]
        rate = opts.fail_after_accept_rate
        if rate and self._rng.random() < rate:
            self._stats["failures_after_accept"] += 1
            return _json_reply(*meta.fault("failure"), delay=delay)
        return _json_reply(200, meta.send_answer(send, message["id"]), delay=delay)

    def _accept(
        self, phone: str, text: str, ref: str | None, extra: dict | None = None
    ) -> dict:
        """Keep an accepted message; count it on the phone unless it never
        reaches it (meta: ``extra["failed_code"]``); schedule its webhooks."""
        opts = self.options
        n = next(self._ids)
        now = time.time()
        msg_id = f"{self._id_prefix}{n:016x}"
        if opts.dialect == "meta":
            msg_id = meta.wamid(_digits(phone), msg_id.upper())
        message = {
            "id": msg_id,
            "waId": msg_id
            if opts.dialect == "meta"
            else f"3EB0{self._id_prefix.upper()}{n:012X}",
            "phone": "+" + _digits(phone),
            "message": text,
            "reference": ref,
            "status": "queued",
            "deliveryStatus": "queued",
            "createdAt": _iso(now),
            "deliverAt": _iso(now),
            **(extra or {}),
        }
        self._messages.append(message)
        self._stats["sends_accepted"] += 1
        if message.get("failed_code"):
            self._stats["undeliverable"] += 1
        else:
            kind = _kind_of(ref)
            counts = self._by_kind.setdefault(message["phone"], {})
            counts[kind] = counts.get(kind, 0) + 1
            if counts[kind] > 1 and kind != "other":
                self._dup_phones.add(message["phone"])
            texts = self._by_text.setdefault(message["phone"], {})
            texts[text] = texts.get(text, 0) + 1
        if ref:
            self._by_ref.setdefault(ref, message)
            count = self._ref_count.get(ref, 0) + 1
            self._ref_count[ref] = count
            if count > self._stats["per_reference_max"]:
                self._stats["per_reference_max"] = count
        if opts.webhook_url:
            self._schedule_webhooks(message, now)
        return message

    def _schedule_webhooks(self, message: dict, now: float) -> None:
        opts = self.options
        acks: list[tuple[float, _Job]] = []
        lost = opts.status_loss_share and self._rng.random() < opts.status_loss_share
        failed_code = message.get("failed_code", 0)
        # A message that never reaches the phone gets one status: failed.
        steps = ("failed",) if failed_code else _ACKS
        if lost:
            self._lost.add(message["id"])
            self._stats["statuses_lost"] += 1
        else:
            for ack, delay_ms in zip(steps, opts.ack_delays_ms, strict=False):
                # Dated when it happened; posted status_delay_ms later.
                at = now + delay_ms / 1000.0
                if opts.dialect == "meta":
                    payload = meta.status_payload(opts, message, ack, at, failed_code)
                else:
                    payload = wassenger.ack_payload(opts, message, ack, at)
                delay_s = (opts.status_delay_ms + delay_ms) / 1000.0
                acks.append((delay_s, _Job("ack", payload, 0)))
        phone = message["phone"]
        plan = None
        if phone not in self._replied and not failed_code:
            plan = reply_plan(
                phone,
                seed=opts.seed,
                reply_share=opts.reply_share,
                opt_out_share=opts.opt_out_share,
            )
        if plan is not None:
            self._replied.add(phone)
            text = "STOP" if plan == "stop" else opts.reply_text
            at = now + opts.reply_delay_ms / 1000.0
            unique = f"{self._id_prefix.upper()}{next(self._ids):020X}"
            if opts.dialect == "meta":
                self._wrote_at[phone] = at  # opens the contact's 24 h window
                msg_id = meta.wamid(_digits(phone), "IN" + unique)
                payload = meta.reply_payload(opts, message, text, at, msg_id)
            else:
                msg_id = "ACB1" + unique
                payload = wassenger.inbound_payload(opts, phone, text, at, msg_id)
            then = tuple(acks) if opts.reply_before_status else ()
            self._webhooks.schedule(
                opts.reply_delay_ms / 1000.0, _Job(plan, payload, 0, then)
            )
            if then:
                return
        for delay_s, job in acks:
            self._webhooks.schedule(delay_s, job)

    def _check(self, phone: str, info: dict, delay: float) -> _Reply:
        self._stats["checks"] += 1
        info["phone"] = phone
        if not _PHONE_RE.match(phone):
            self._stats["invalid_requests"] += 1
            return _error_reply(400, "invalid_phone", f"invalid phone {phone!r}", delay)
        if not self._exists(phone):
            return _json_reply(404, {"message": "Phone not found"}, delay=delay)
        digits = _digits(phone)
        return _json_reply(
            200,
            {
                "exists": True,
                "phone": "+" + digits,
                "wid": digits + "@c.us",
                "isBusiness": False,
                "link": f"https://wa.me/{digits}",
            },
            delay=delay,
        )

    def _exists(self, phone: str) -> bool:
        digits = _digits(phone)
        suffix = self.options.invalid_suffix
        if suffix and digits.endswith(suffix):
            return False
        return digits not in self.options.invalid_numbers
