"""A Wassenger-compatible fake provider: a real HTTP server on loopback.

Used by demos, tests and benchmarks, so it must never be the bottleneck: the
API is served by an asyncio.Protocol HTTP/1.1 keep-alive server (no per-request
objects beyond a dict and a bytes), all state behind one lock, and webhooks are
posted by background threads from a timer heap, away from the API path.

API (what campaignd's Wassenger client uses):
  POST /v1/messages               send; a repeated ``reference`` is a second
                                  message, as at Wassenger (``dedupe=True``:
                                  the original, 200)
  GET  /v1/numbers/exists?phone=  200 {"exists": true, ...} or 404
  POST /v1/numbers/exists         same, body {"phone": ...}
  GET  /v1/devices[/{id}]         session.status "online" (configurable)
Control (never affected by faults or the token):
  GET /_fake/stats, GET /_fake/messages, GET /_fake/phones[?by=text],
  GET|POST /_fake/config, POST /_fake/reset

A send is accepted as soon as its whole body is received: the answer then
waits for its latency and is written only if the client is still there, so a
client that gave up (timeout, killed) may still have sent a message, as with a
real provider. ``phone_counts`` says what each phone received, per kind.

Who replies is deterministic: see ``reply_plan``. Numbers in ``invalid_numbers``
or ending in ``invalid_suffix`` are not on WhatsApp (404 on checks, 400 on sends).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import heapq
import itertools
import json
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import NamedTuple
from urllib.parse import parse_qs
from urllib.parse import urlsplit

from daemon.providers.base import sign_hmac_sha256


@dataclass(frozen=True)
class FakeOptions:
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
    device_phone: str = "+15550000001"
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
    }
)
_RATES = (
    "fail_rate",
    "fail_after_accept_rate",
    "rate_limit_rate",
    "reply_share",
    "slow_share",
    "status_loss_share",
)
# The kind of a message from its reference: campaignd's idempotency keys end
# in -m<kind> (cd-<campaign>-<contact>-m1); ":m1" and "_m1" are read too.
_KIND_RE = re.compile(r"(?:^|[-:_])(m\d+)$")
_ACKS = ("sent", "delivered", "read")
_PHONE_RE = re.compile(r"^\+?[1-9]\d{5,14}$")
_WEBHOOK_TIMEOUT_S = 5.0
_MAX_HEAD = 64 * 1024
_MAX_BODY = 4 * 1024 * 1024
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


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
    numbers = frozenset(_digits(n) for n in opts.invalid_numbers)
    return dataclasses.replace(opts, invalid_numbers=numbers)


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


class _Reply(NamedTuple):
    status: int
    body: bytes
    headers: str  # extra header lines, each ending in CRLF
    delay: float  # seconds before the answer is written


def _json_reply(status: int, obj: Any, headers: str = "", delay: float = 0.0) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), headers, delay)


def _error_reply(status: int, code: str, message: str, delay: float = 0.0) -> _Reply:
    return _json_reply(status, {"error": code, "message": message}, delay=delay)


class _Job(NamedTuple):
    kind: str  # "ack", "reply" or "stop"
    payload: dict
    attempt: int
    # (delay_s, job) scheduled once this job is done (delivered or given up):
    # how acks follow a reply with reply_before_status.
    then: tuple[tuple[float, _Job], ...] = ()


class _Poster:
    """A bare HTTP/1.1 keep-alive POST client for one webhook URL and one thread.

    http.client costs about five times more CPU per post, and these threads
    share the GIL with the API loop. Webhooks are at-least-once anyway, so a
    post that fails on a reused connection is simply sent again on a new one.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"webhook_url must be an http:// URL, got {url!r}")
        self._addr = (parts.hostname, parts.port or 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._head = (
            f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\nUser-Agent: fake-wassenger\r\n"
        )
        self._sock: socket.socket | None = None
        self._buf = b""

    def post(self, body: bytes, headers: str) -> int:
        """POST ``body`` with extra header lines; the status, or OSError."""
        data = self._head + headers + f"Content-Length: {len(body)}\r\n\r\n"
        request = data.encode("latin-1") + body
        while True:
            fresh = self._sock is None
            if self._sock is None:
                self._sock = socket.create_connection(self._addr, _WEBHOOK_TIMEOUT_S)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._buf = b""
            try:
                self._sock.sendall(request)
                return self._response()
            except TimeoutError:
                self.close()
                raise
            except OSError:
                self.close()
                if fresh:
                    raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("webhook receiver closed the connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while (eol := self._buf.find(b"\r\n")) < 0:
            self._recv()
        line, self._buf = self._buf[:eol], self._buf[eol + 2 :]
        return line

    def _response(self) -> int:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        self._buf = self._buf[end + 4 :]
        version, status_text = lines[0].split(" ", 2)[:2]
        status = int(status_text)
        if 100 <= status < 200:
            return self._response()  # 100 Continue and friends: skip
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        connection = fields.get("connection", "")
        if version == "HTTP/1.1":
            keep = connection != "close"
        else:
            keep = connection == "keep-alive"
        if "content-length" in fields:
            length = int(fields["content-length"])
            while len(self._buf) < length:
                self._recv()
            self._buf = self._buf[length:]
        elif fields.get("transfer-encoding", "").endswith("chunked"):
            while size := int(self._line().split(b";")[0], 16):
                while len(self._buf) < size + 2:
                    self._recv()
                self._buf = self._buf[size + 2 :]
            while self._line():  # trailers end with an empty line
                pass
        elif status not in (204, 304):
            try:  # no length: the body ends when the connection does
                while True:
                    self._recv()
            except ConnectionResetError:
                keep = False
        if not keep:
            self.close()
        return status


class _Webhooks:
    """Posts webhook jobs when due: a timer heap drained by a few threads."""

    def __init__(self, core: _Core, threads: int) -> None:
        self._core = core
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._inflight = 0  # jobs taken off the heap, not yet finished
        self._threads = [
            threading.Thread(target=self._run, name=f"fake-webhook-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)

    def schedule(self, delay_s: float, job: _Job) -> None:
        with self._cond:
            heapq.heappush(
                self._heap, (time.monotonic() + delay_s, next(self._seq), job)
            )
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()

    def pending(self) -> int:
        """Jobs waiting or being posted (0 means every webhook has settled)."""
        with self._cond:
            return len(self._heap) + self._inflight

    def _next_job(self) -> _Job | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    job = heapq.heappop(self._heap)[2]
                    self._inflight += 1
                    if self._heap:
                        # Another job may be due too: let a sibling look.
                        self._cond.notify()
                    return job
                timeout = self._heap[0][0] - now if self._heap else None
                self._cond.wait(timeout)
            return None

    def _run(self) -> None:
        posters: dict[str, _Poster] = {}  # this thread's connections, by URL
        try:
            while (job := self._next_job()) is not None:
                try:
                    self._deliver(job, posters)
                finally:
                    with self._cond:
                        self._inflight -= 1
        finally:
            for poster in posters.values():
                poster.close()

    def _deliver(self, job: _Job, posters: dict[str, _Poster]) -> None:
        opts = self._core.options
        if not opts.webhook_url:
            return
        raw = json.dumps(job.payload).encode()
        headers = ""
        if opts.webhook_secret:
            signature = sign_hmac_sha256(opts.webhook_secret, raw)
            headers = (
                f"X-Webhook-Secret: {opts.webhook_secret}\r\n"
                f"X-Wassenger-Signature: {signature}\r\n"
            )
        try:
            poster = posters.get(opts.webhook_url)
            if poster is None:
                poster = posters[opts.webhook_url] = _Poster(opts.webhook_url)
            ok = 200 <= poster.post(raw, headers) < 300
        except (OSError, ValueError):
            ok = False
        if ok:
            self._core.webhook_done(job.kind)
        elif job.attempt < opts.webhook_retries:
            # Like a real provider: back off and try again, a few times.
            self._core.count("webhooks_retried")
            delay = opts.webhook_backoff_ms / 1000.0 * 2**job.attempt
            self.schedule(delay, job._replace(attempt=job.attempt + 1))
            return
        else:
            self._core.count("webhooks_failed")
        for delay_s, follower in job.then:
            self.schedule(delay_s, follower)


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
        if opts.down:
            self._stats["failures_503"] += 1
            return _error_reply(503, "unavailable", "fake provider is down", delay)
        if opts.token and not _authorized(headers, opts.token):
            self._stats["unauthorized"] += 1
            return _error_reply(
                401, "unauthorized", "invalid or missing API token", delay
            )
        if opts.rate_limit_rate or opts.fail_rate:
            roll = self._rng.random()
            if roll < opts.rate_limit_rate:
                self._stats["failures_429"] += 1
                reply = _error_reply(429, "rate_limit", "too many requests", delay)
                retry_after = f"Retry-After: {opts.retry_after_s}\r\n"
                return reply._replace(headers=retry_after)
            if roll < opts.rate_limit_rate + opts.fail_rate:
                self._stats["failures_500"] += 1
                return _error_reply(500, "internal_error", "injected failure", delay)
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
            device = self._device(device_id)
            return _json_reply(200, device if device_id else [device], delay=delay)
        return _error_reply(404, "not_found", f"no route {method} {path}", delay)

    def _latency(self, method: str, path: str) -> float:
        """Seconds before this answer: latency, jitter, or a slow send."""
        opts = self.options
        delay = opts.latency_ms / 1000.0
        if opts.latency_jitter_ms:
            delay += self._rng.uniform(0.0, opts.latency_jitter_ms) / 1000.0
        if opts.slow_share and path == "/v1/messages" and method == "POST":
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

    def _accept(self, phone: str, text: str, ref: str | None) -> dict:
        opts = self.options
        n = next(self._ids)
        now = time.time()
        message = {
            "id": f"{self._id_prefix}{n:016x}",
            "waId": f"3EB0{self._id_prefix.upper()}{n:012X}",
            "phone": "+" + _digits(phone),
            "message": text,
            "reference": ref,
            "status": "queued",
            "deliveryStatus": "queued",
            "createdAt": _iso(now),
            "deliverAt": _iso(now),
        }
        self._messages.append(message)
        self._stats["sends_accepted"] += 1
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
        if lost:
            self._lost.add(message["id"])
            self._stats["statuses_lost"] += 1
        else:
            for ack, delay_ms in zip(_ACKS, opts.ack_delays_ms, strict=False):
                # Dated when it happened; posted status_delay_ms later.
                payload = self._ack_payload(message, ack, now + delay_ms / 1000.0)
                delay_s = (opts.status_delay_ms + delay_ms) / 1000.0
                acks.append((delay_s, _Job("ack", payload, 0)))
        phone = message["phone"]
        plan = None
        if phone not in self._replied:
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
            payload = self._inbound_payload(phone, text, at)
            then = tuple(acks) if opts.reply_before_status else ()
            self._webhooks.schedule(
                opts.reply_delay_ms / 1000.0, _Job(plan, payload, 0, then)
            )
            if then:
                return
        for delay_s, job in acks:
            self._webhooks.schedule(delay_s, job)

    def _device_ref(self) -> dict:
        opts = self.options
        return {
            "id": opts.device_id,
            "phone": opts.device_phone,
            "alias": "fake-provider",
            "plan": "io-professional",
        }

    def _ack_payload(self, message: dict, ack: str, at: float) -> dict:
        phone = message["phone"]
        return {
            "id": message["waId"],
            "object": "message",
            "event": "message:out:ack",
            "created": int(at),
            "device": self._device_ref(),
            "data": {
                "id": message["waId"],
                "type": "text",
                "flow": "outbound",
                "ack": ack,
                "from": self.options.device_phone.lstrip("+") + "@c.us",
                "fromNumber": self.options.device_phone,
                "to": phone.lstrip("+") + "@c.us",
                "toNumber": phone,
                "body": message["message"],
                "reference": message["reference"],
                "date": _iso(at),
                "timestamp": int(at),
            },
        }

    def _inbound_payload(self, phone: str, text: str, at: float) -> dict:
        opts = self.options
        msg_id = f"ACB1{self._id_prefix.upper()}{next(self._ids):020X}"
        wid = phone.lstrip("+") + "@c.us"
        return {
            "id": msg_id,
            "object": "message",
            "event": "message:in:new",
            "created": int(at),
            "device": self._device_ref(),
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

    def _device(self, device_id: str | None) -> dict:
        return {
            **self._device_ref(),
            "id": device_id or self.options.device_id,
            "status": "operative",
            "session": {"status": self.options.session_status},
            "billing": {"subscription": {"product": "io"}},
        }


def _authorized(headers: dict, token: str) -> bool:
    if headers.get("token") == token:
        return True
    auth = headers.get("authorization", "")
    return auth == token or auth == f"Bearer {token}"


def _json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _options_json(opts: FakeOptions) -> dict:
    out = dataclasses.asdict(opts)
    out["invalid_numbers"] = sorted(opts.invalid_numbers)
    out["ack_delays_ms"] = list(opts.ack_delays_ms)
    return out


class _HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; answers strictly in order.

    A request is handled (a send accepted) as soon as it is received whole;
    its answer waits in ``_answers`` for its turn and its latency, each answer
    ``delay`` after the previous one was written. A client gone by then
    misses the answer, not the send.
    """

    def __init__(self, core: _Core, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._loop = loop
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None  # None once closing
        self._registered: asyncio.BaseTransport | None = None
        self._busy = False  # an answer is waiting for its latency
        self._done = False  # a last request (Connection: close, bad) was read
        self._answers: deque[tuple[bytes, bool, float]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = self._registered = transport
        self._core.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._registered is not None:
            self._core.connection_lost(self._registered)
        self._transport = self._registered = None

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # nothing after a last request is read
        self._buf += data
        self._parse()
        self._pump()

    def _parse(self) -> None:
        """Handle every request received whole; queue the answers in order."""
        buf = self._buf
        while not self._done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail(431)
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail(400)
                return
            method, target, version = parts
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                self._fail(501)  # our clients always send Content-Length
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail(400)
                return
            if not 0 <= length <= _MAX_BODY:
                self._fail(413)
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.1":
                keep = connection != "close"
            else:
                keep = connection == "keep-alive"
            reply = self._core.handle(method, target, headers, body)
            self._answers.append((_render(reply, keep), keep, reply.delay))
            if not keep:
                self._done = True
                buf.clear()

    def _pump(self) -> None:
        """Write the queued answers in order, each after its delay."""
        while self._answers and not self._busy:
            data, keep, delay = self._answers.popleft()
            if delay > 0:
                self._busy = True
                self._loop.call_later(delay, self._write_later, data, keep)
                return
            self._write(data, keep)

    def _write(self, data: bytes, keep: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(data)
        if not keep:
            self._transport.close()
            self._transport = None

    def _write_later(self, data: bytes, keep: bool) -> None:
        self._busy = False
        self._write(data, keep)
        self._pump()

    def _fail(self, status: int) -> None:
        reply = _error_reply(status, "bad_request", _REASONS.get(status, "error"))
        self._answers.append((_render(reply, keep=False), False, 0.0))
        self._done = True
        self._buf.clear()


def _render(reply: _Reply, keep: bool) -> bytes:
    close = "" if keep else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(reply.body)}\r\n"
        f"{reply.headers}{close}\r\n"
    )
    return head.encode("latin-1") + reply.body


class FakeProvider:
    """The fake provider running in a background thread of this process.

    ``with FakeProvider(FakeOptions(...)) as fake: fake.url`` binds at once, so
    ``url`` is usable on the next line.
    """

    def __init__(self, options: FakeOptions | None = None) -> None:
        self._core = _Core(options or FakeOptions())
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def options(self) -> FakeOptions:
        return self._core.options

    @property
    def url(self) -> str:
        """Base URL for ProviderConfig.base_url (the API root without /v1)."""
        return f"http://{self._core.options.host}:{self.port}"

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeProvider:
        """Bind, then serve on a daemon thread."""
        self._bind()
        self._core.start()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(in_main=False)),
            name="fake-provider",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake provider did not start")
        return self

    def stop(self) -> None:
        """Stop serving, drop connections and pending webhooks."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:
                pass  # the loop already finished
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._core.stop()

    def serve_forever(self) -> None:
        """Serve on this (main) thread until SIGTERM or SIGINT."""
        self._bind()
        self._core.start()
        try:
            asyncio.run(self._serve(in_main=True))
        finally:
            self._core.stop()

    def stats(self) -> dict[str, int]:
        return self._core.stats()

    def messages(self) -> list[dict]:
        return self._core.messages()

    def phone_counts(self, by: str = "kind") -> dict[str, dict[str, int]]:
        """{phone: {"m1": n, "m2": n}}: what each phone received (see _Core)."""
        return self._core.phone_counts(by)

    def duplicates(self) -> dict[str, dict[str, int]]:
        """{phone: {kind: n}} of phones that got one kind more than once."""
        return self._core.duplicates()

    def reset(self) -> None:
        self._core.reset()

    def configure(self, **changes: Any) -> FakeOptions:
        """Change runtime options, as POST /_fake/config does."""
        return self._core.configure(changes)

    def _bind(self) -> None:
        opts = self._core.options
        self._sock = socket.create_server((opts.host, opts.port), backlog=1024)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]

    async def _serve(self, in_main: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        server = await loop.create_server(
            lambda: _HttpProtocol(self._core, loop), sock=self._sock, backlog=1024
        )
        if in_main:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop_event.set)
            print(f"fake provider listening on {self.url}", flush=True)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            self._core.abort_connections()
            await server.wait_closed()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fake-provider CLI flags (defaults as in FakeOptions, port 8099)."""
    d = FakeOptions()
    add = parser.add_argument
    add("--host", default=d.host)
    add("--port", type=int, default=8099, help="0 picks a free port")
    add("--token", default=d.token, help="required Token header (default: none)")
    add("--latency-ms", type=float, default=d.latency_ms)
    add("--latency-jitter-ms", type=float, default=d.latency_jitter_ms)
    add("--slow-share", type=float, default=d.slow_share, help="share of slow sends")
    add("--slow-latency-ms", type=float, default=d.slow_latency_ms)
    add("--fail-rate", type=float, default=d.fail_rate, help="share answered 500")
    add("--fail-after-accept-rate", type=float, default=d.fail_after_accept_rate)
    add("--rate-limit-rate", type=float, default=d.rate_limit_rate)
    add("--retry-after-s", type=int, default=d.retry_after_s)
    add("--down", action="store_true", help="answer 503 to every API call")
    add(
        "--dedupe",
        action="store_true",
        default=d.dedupe,
        help="a repeated reference returns the original (default: a new message)",
    )
    add("--no-dedupe", dest="dedupe", action="store_false", help="the default")
    add("--invalid-number", action="append", default=[], metavar="PHONE")
    add("--invalid-suffix", default=d.invalid_suffix)
    add("--webhook-url", default=d.webhook_url)
    add("--webhook-secret", default=d.webhook_secret)
    add("--webhook-threads", type=int, default=d.webhook_threads)
    add(
        "--ack-delays-ms",
        default=",".join(f"{v:g}" for v in d.ack_delays_ms),
        help="sent,delivered,read delays; empty for no acks",
    )
    add("--status-delay-ms", type=float, default=d.status_delay_ms)
    add("--status-loss-share", type=float, default=d.status_loss_share)
    add("--reply-before-status", action="store_true")
    add("--reply-share", type=float, default=d.reply_share)
    add("--reply-delay-ms", type=float, default=d.reply_delay_ms)
    add("--reply-text", default=d.reply_text)
    add("--opt-out-share", type=float, default=d.opt_out_share)
    add("--log-path", default=d.log_path)
    add("--seed", type=int, default=d.seed)


def options_from_args(args: argparse.Namespace) -> FakeOptions:
    """FakeOptions from parsed add_arguments flags (ValueError if invalid)."""
    delays = tuple(float(v) for v in args.ack_delays_ms.split(",") if v.strip())
    return checked_options(
        FakeOptions(
            host=args.host,
            port=args.port,
            token=args.token,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            slow_share=args.slow_share,
            slow_latency_ms=args.slow_latency_ms,
            fail_rate=args.fail_rate,
            fail_after_accept_rate=args.fail_after_accept_rate,
            rate_limit_rate=args.rate_limit_rate,
            retry_after_s=args.retry_after_s,
            down=args.down,
            dedupe=args.dedupe,
            invalid_numbers=frozenset(args.invalid_number),
            invalid_suffix=args.invalid_suffix,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            webhook_threads=args.webhook_threads,
            ack_delays_ms=delays,
            status_delay_ms=args.status_delay_ms,
            status_loss_share=args.status_loss_share,
            reply_before_status=args.reply_before_status,
            reply_share=args.reply_share,
            reply_delay_ms=args.reply_delay_ms,
            reply_text=args.reply_text,
            opt_out_share=args.opt_out_share,
            log_path=args.log_path,
            seed=args.seed,
        )
    )


def main(args: argparse.Namespace) -> int:
    """Run the fake provider in the foreground; 0 on SIGTERM/SIGINT."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    try:
        FakeProvider(options).serve_forever()
    except OSError as exc:
        print(f"fake-provider: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m daemon.providers.fake")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
