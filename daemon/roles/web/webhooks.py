"""Provider webhooks: verify, persist, then acknowledge.

A 2xx means "stored": each event of the POST is inserted into inbound_event
under a unique dedupe key and committed before we answer, so a provider that
retries a delivery we already have gets a 2xx and changes nothing, and a
database we cannot write gets a 503 (the provider retries later). On SQLite
the webhook commits are durable (synchronous=FULL: one fsync per group
commit), so an acknowledged event also survives a power cut.

Processing happens on the 'default' queue, enqueued AFTER the answer by a
thread of its own (event_writer.py), within web.enqueue_timeout_s: a hung or refused
queue backend delays processing, never a webhook. What is not enqueued stays
unprocessed in inbound_event and the sweeper replays it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import falcon

from daemon import metrics
from daemon.config import Config
from daemon.providers import webhook_parser
from daemon.providers.base import as_text
from daemon.providers.base import storable_text
from daemon.providers.base import verify_hmac_sha256
from daemon.roles.web import parse_json_object
from daemon.roles.web import read_body
from daemon.roles.web.event_writer import EventWriter
from daemon.store.models import utcnow

_KEY_LIMIT = 300  # inbound_event.dedupe_key
_TYPE_LIMIT = 60  # inbound_event.event_type


def event_type_of(provider: str, item: dict) -> str:
    """A short name for an event item: Wassenger's `event`, Meta's item kind."""
    if provider == "wassenger":
        return as_text(item.get("event")) or "unknown"
    if isinstance(item.get("message"), dict):
        return "message"
    status = item.get("status")
    if isinstance(status, dict):
        return f"status:{as_text(status.get('status')) or 'unknown'}"
    if "errors" in item:
        return "errors"
    return as_text(item.get("field")) or "unknown"


def storable_key(key: str) -> str:
    """The dedupe key as the column can hold it (long keys keep a hash tail)."""
    key = storable_text(key)[:10_000]
    if len(key) <= _KEY_LIMIT:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: _KEY_LIMIT - 65]}:{digest}"


class WebhookIngest:
    """Persist-then-ack for one provider's payloads."""

    def __init__(
        self,
        provider: str,
        tasks,
        clock: Callable[[], Any] = utcnow,
        writer: EventWriter | None = None,
    ):
        self.provider = provider
        self.parser = webhook_parser(provider)
        self.clock = clock
        self.writer = writer or EventWriter(tasks)

    def ingest(self, body: dict, raw: bytes | None = None) -> tuple[int, int]:
        """Store every new event of `body` (parsed from `raw`, when given);
        (stored, duplicates)."""
        items = self.parser.split(body)
        now = self.clock()
        rows: dict[str, dict] = {}
        for key, item in items:
            key = storable_key(key)
            if key in rows:
                continue
            event_type = event_type_of(self.provider, item)
            rows[key] = {
                "provider": self.provider,
                "dedupe_key": key,
                "event_type": storable_text(event_type)[:_TYPE_LIMIT],
                "payload": _payload_text(item, body, raw),
                "received_at": now,
                "attempts": 0,
            }
        try:
            # The writer counts the request (stored or duplicate) and its
            # new events.
            inserted = self.writer.store(list(rows.values()))
        except Exception:
            metrics.labelled(
                metrics.WEBHOOK_REQUESTS, self.provider, "unavailable"
            ).inc()
            raise
        return len(inserted), len(items) - len(inserted)


def _payload_text(item: dict, body: dict, raw: bytes | None) -> str:
    """The JSON stored for an event item. A whole body (every Wassenger event)
    is stored as received: it decoded as UTF-8 and parsed as JSON, so it holds
    no NUL byte or lone surrogate and any database stores it (and encoding it
    again was a third of a webhook's Python). A part of a body (Meta's items)
    is encoded, ASCII-escaped, so any text the provider sends can be stored."""
    if item is body and raw is not None:
        return raw.decode("utf-8")
    return json.dumps(item, ensure_ascii=True, separators=(",", ":"))


def _unauthorized(provider: str, description: str) -> falcon.HTTPUnauthorized:
    metrics.labelled(metrics.WEBHOOK_REQUESTS, provider, "unauthorized").inc()
    return falcon.HTTPUnauthorized(title="Unauthorized", description=description)


def _secret_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(
        expected.encode(), given.encode("utf-8", "replace")
    )


def _verified_payload(
    req: falcon.Request, provider: str, secret: str, header: str
) -> tuple[dict, bytes]:
    """The JSON object of the body and the body, after checking its HMAC when
    `secret` is set."""
    raw = read_body(req)
    if secret and not verify_hmac_sha256(secret, raw, req.get_header(header)):
        raise _unauthorized(provider, f"missing or wrong {header} (sha256=<hex>)")
    try:
        return parse_json_object(raw, strict_text=False), raw
    except falcon.HTTPError:
        metrics.labelled(metrics.WEBHOOK_REQUESTS, provider, "invalid").inc()
        raise


def _acknowledge(resp: falcon.Response, stored: int, dups: int):
    # The JSON of resp.media, written out: falcon's media handler cost more
    # than the rest of the answer.
    resp.content_type = falcon.MEDIA_JSON
    resp.data = b'{"stored":%d,"duplicates":%d}' % (stored, dups)


class WassengerWebhook:
    """POST /webhooks/wassenger"""

    # The EventWriter thread does the database work, on its own connection.
    uses_database = False

    def __init__(self, cfg: Config, ingest: WebhookIngest):
        self.secret = cfg.web.webhook_secret
        self.hmac_secret = cfg.web.webhook_hmac_secret
        self.ingest = ingest

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.secret:
            given = req.get_header("X-Webhook-Secret") or req.get_param("token")
            if not _secret_matches(self.secret, given):
                raise _unauthorized(
                    "wassenger", "missing or wrong X-Webhook-Secret header / token"
                )
        body, raw = _verified_payload(
            req, "wassenger", self.hmac_secret, "X-Wassenger-Signature"
        )
        stored, dups = self.ingest.ingest(body, raw)
        _acknowledge(resp, stored, dups)


class MetaWebhook:
    """GET (verification handshake) and POST /webhooks/whatsapp"""

    # The EventWriter thread does the database work, on its own connection.
    uses_database = False

    def __init__(self, cfg: Config, ingest: WebhookIngest):
        self.verify_token = cfg.provider.verify_token
        self.app_secret = cfg.provider.app_secret
        # Meta cannot add headers; without an app secret the URL token is
        # what keeps strangers out.
        self.url_token = cfg.web.webhook_secret
        self.ingest = ingest

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        mode = req.get_param("hub.mode")
        token = req.get_param("hub.verify_token")
        challenge = req.get_param("hub.challenge") or ""
        if (
            mode != "subscribe"
            or not self.verify_token
            or not _secret_matches(self.verify_token, token)
        ):
            raise falcon.HTTPForbidden(
                title="Forbidden",
                description="hub.mode must be subscribe and hub.verify_token must "
                "match provider.verify_token",
            )
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = challenge

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self.app_secret and self.url_token:
            if not _secret_matches(self.url_token, req.get_param("token")):
                raise _unauthorized("meta", "missing or wrong ?token=")
        body, raw = _verified_payload(
            req, "meta", self.app_secret, "X-Hub-Signature-256"
        )
        stored, dups = self.ingest.ingest(body, raw)
        _acknowledge(resp, stored, dups)
