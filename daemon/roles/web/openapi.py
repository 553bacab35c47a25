"""The OpenAPI 3.1 description of every route the web role serves.

Served at GET /api/v1/openapi.json; the tests validate real responses against
it (schemathesis), so a route or field added without updating this file fails
the suite.
"""

from __future__ import annotations

from daemon import __version__
from daemon.roles.web.openapi_schemas import INT
from daemon.roles.web.openapi_schemas import MAX_ID
from daemon.roles.web.openapi_schemas import MESSAGE_STATUSES
from daemon.roles.web.openapi_schemas import SCHEMAS
from daemon.roles.web.openapi_schemas import STR
from daemon.roles.web.openapi_schemas import STRICT
from daemon.roles.web.openapi_schemas import error
from daemon.roles.web.openapi_schemas import json_response
from daemon.roles.web.openapi_schemas import obj
from daemon.roles.web.openapi_schemas import ref

__all__ = ["MAX_ID", "MESSAGE_STATUSES", "build_spec"]

_AUTH_ERRORS = {
    "401": error("missing or wrong bearer token"),
    "403": error("admin API disabled (web.api_token is empty)"),
    "429": error(
        "too many wrong tokens from this address within a minute; retry after"
        " Retry-After seconds"
    ),
}
_COMMON_ERRORS = {
    "413": error("body larger than web.max_body_bytes"),
    "503": error("the database cannot answer; retry later (Retry-After)"),
}
_CAMPAIGN_ID = {
    "name": "campaign_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
}
_CONTACT_REF = {
    "name": "ref",
    "in": "path",
    "required": True,
    "description": "numeric contact id, or E.164 phone with its '+' (%2B)",
    "schema": {"type": "string", "minLength": 1, "maxLength": 40},
}


def _query(name: str, schema: dict, description: str = "") -> dict:
    out = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        out["description"] = description
    return out


def _op(summary: str, responses: dict, *, admin=True, body=None, params=None) -> dict:
    op: dict = {"summary": summary, "responses": dict(responses)}
    if admin:
        op["security"] = [{"bearer": []}]
        op["responses"].update(_AUTH_ERRORS)
    op["responses"].update(_COMMON_ERRORS)
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    return op


def _json_body(schema: dict, *, required=True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


_WEBHOOK_BODY = _json_body({"type": "object"})
_WEBHOOK_RESPONSES = {
    "200": json_response(ref("WebhookAck"), "every event stored (or already stored)"),
    "400": error("not a JSON object, invalid UTF-8, or nested too deeply"),
    "401": error("wrong or missing secret or signature"),
}


def _action(name: str, summary: str, body=None) -> dict:
    return {
        "parameters": [_CAMPAIGN_ID],
        "post": _op(
            summary,
            {
                "200": json_response(
                    ref("CampaignSummary"), "the campaign after the change"
                ),
                "400": error("invalid body"),
                "404": error("no such campaign"),
                "409": error(f"the campaign's state does not allow {name}"),
            },
            body=body,
        ),
    }


_IDS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 100_000,
    "items": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
}


def _paths() -> dict:
    summary_ok = json_response(
        ref("CampaignSummary"), "the campaign with live counters"
    )
    create_body = _json_body(
        obj(
            {
                "name": {"type": "string", "minLength": 1, "maxLength": 200},
                "message1": {"type": "string", "minLength": 1, "maxLength": 4096},
                "message2": {"type": "string", "minLength": 1, "maxLength": 4096},
                "contacts": ref("ContactsInput"),
                "contact_ids": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                },
                "region": {"type": "string", "default": "FR", "maxLength": 8},
                "skip_invalid": {"type": "boolean", "default": True},
                "start": {"type": "boolean", "default": False},
                "strict": STRICT,
            },
            required=["name", "message1", "message2"],
        )
    )
    _started = json_response(
        ref("VerificationStarted"),
        "checks queued (one a 60/verify_per_minute s); the figures and ETA",
    )
    reason_body = _json_body(
        obj({"reason": {"type": "string", "maxLength": 500}}, required=[]),
        required=False,
    )
    return {
        "/webhooks/wassenger": {
            "post": _op(
                "Wassenger webhook: store every event, then answer",
                _WEBHOOK_RESPONSES,
                admin=False,
                body=_WEBHOOK_BODY,
                params=[_query("token", STR, "shared secret (or X-Webhook-Secret)")],
            )
        },
        "/webhooks/whatsapp": {
            "get": {
                "summary": "Meta verification handshake",
                "parameters": [
                    _query("hub.mode", STR),
                    _query("hub.verify_token", STR),
                    _query("hub.challenge", STR),
                ],
                "responses": {
                    "200": {
                        "description": "the challenge, echoed",
                        "content": {"text/plain": {"schema": STR}},
                    },
                    "403": error("wrong mode or verify token"),
                },
            },
            "post": _op(
                "Meta Cloud API webhook: store every entry, then answer",
                _WEBHOOK_RESPONSES,
                admin=False,
                body=_WEBHOOK_BODY,
                params=[_query("token", STR, "shared secret when no app secret")],
            ),
        },
        "/healthz": {
            "get": {
                "summary": "the process serves requests",
                "responses": {"200": json_response(obj({"status": STR}), "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "the database and the queue answer",
                "responses": {
                    "200": json_response(ref("Readiness"), "ready"),
                    "503": json_response(ref("Readiness"), "not ready; checks say why"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of every campaignd process",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": STR}},
                    }
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": json_response({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/api/v1/campaigns": {
            "get": _op(
                "list campaigns",
                {
                    "200": json_response(
                        obj(
                            {
                                "campaigns": {
                                    "type": "array",
                                    "items": ref("CampaignListItem"),
                                }
                            }
                        ),
                        "every campaign",
                    )
                },
            ),
            "post": _op(
                "create a campaign (draft, or started with start=true)",
                {
                    "201": json_response(ref("CampaignSummary"), "created"),
                    "400": error("invalid body, template or contacts"),
                    "404": error("a contact id does not exist"),
                },
                body=create_body,
            ),
        },
        "/api/v1/campaigns/{campaign_id}": {
            "parameters": [_CAMPAIGN_ID],
            "get": _op(
                "one campaign with live counters",
                {"200": summary_ok, "404": error("no such campaign")},
            ),
        },
        "/api/v1/campaigns/{campaign_id}/start": _action("start", "draft -> running"),
        "/api/v1/campaigns/{campaign_id}/pause": _action(
            "pause", "running -> paused", reason_body
        ),
        "/api/v1/campaigns/{campaign_id}/resume": _action(
            "resume", "paused -> running"
        ),
        "/api/v1/campaigns/{campaign_id}/cancel": _action(
            "cancel", "cancel; messages not yet sent are cancelled"
        ),
        "/api/v1/campaigns/{campaign_id}/retry-failed": _action(
            "retry", "queue every failed message again"
        ),
        "/api/v1/campaigns/{campaign_id}/verify": {
            "parameters": [_CAMPAIGN_ID],
            "post": _op(
                "check every member's number (a re-check; opted out: left out)",
                {
                    "202": _started,
                    "400": error("a body was sent (none is expected)"),
                    "404": error("no such campaign"),
                },
                body=_json_body(obj({}, required=[]), required=False),
            ),
        },
        "/api/v1/contacts/verify": {
            "post": _op(
                "check these contacts' numbers, or every one never found "
                "valid or invalid",
                {
                    "202": _started,
                    "400": error("invalid body"),
                    "404": error("a contact id does not exist"),
                },
                body=_json_body(
                    {
                        "oneOf": [
                            obj({"contact_ids": _IDS}),
                            obj({"all_unknown": {"const": True}}),
                        ]
                    }
                ),
            ),
        },
        "/api/v1/contacts/import": {
            "post": _op(
                "import contacts (upsert by phone)",
                {
                    "200": json_response(ref("ImportReport"), "imported"),
                    "400": error(
                        "no valid contact, a bad row with strict (nothing "
                        "imported; every bad row in errors), or an invalid body"
                    ),
                },
                body={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": obj(
                                {
                                    "contacts": ref("ContactsInput"),
                                    "region": {"type": "string", "maxLength": 8},
                                    "strict": STRICT,
                                },
                                required=["contacts"],
                            )
                        },
                        "text/csv": {"schema": STR},
                    },
                },
                params=[
                    _query("region", STR, "default region for text/csv bodies"),
                    _query(
                        "strict",
                        {"type": "boolean", "default": False},
                        "text/csv bodies: refuse the whole body if any row is bad",
                    ),
                ],
            )
        },
        "/api/v1/contacts/{ref}": {
            "parameters": [_CONTACT_REF],
            "get": _op(
                "one contact and its campaigns",
                {
                    "200": json_response(ref("Contact"), "the contact"),
                    "400": error("not an id nor an E.164 phone"),
                    "404": error("no such contact"),
                },
            ),
        },
        "/api/v1/contacts/{ref}/opt-out": {
            "parameters": [_CONTACT_REF],
            "post": _op(
                "opt a contact out of every campaign, now and later",
                {
                    "200": json_response(ref("Contact"), "the contact, opted out"),
                    "400": error("invalid body or reference"),
                    "404": error("no such contact"),
                },
                body=reason_body,
            ),
        },
        "/api/v1/messages": {
            "get": _op(
                "messages, oldest first, filtered and paged",
                {
                    "200": json_response(
                        obj(
                            {
                                "messages": {"type": "array", "items": ref("Message")},
                                "next_cursor": {"type": ["integer", "null"]},
                            }
                        ),
                        "a page; pass next_cursor as cursor for the next one",
                    ),
                    "400": error("invalid query parameter"),
                },
                params=[
                    _query(
                        "campaign_id",
                        {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                    ),
                    _query(
                        "contact_id",
                        {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                    ),
                    _query(
                        "status", {"type": "string", "enum": list(MESSAGE_STATUSES)}
                    ),
                    _query("kind", {"type": "integer", "enum": [1, 2]}),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    ),
                    _query(
                        "offset", {"type": "integer", "minimum": 0, "maximum": 10**9}
                    ),
                    _query(
                        "cursor",
                        {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                        "last id seen (exclusive); not with offset",
                    ),
                ],
            )
        },
        "/api/v1/events": {
            "get": _op(
                "stored webhook events, newest first; dead=true: the dead letters",
                {
                    "200": json_response(
                        obj(
                            {
                                "events": {
                                    "type": "array",
                                    "items": ref("WebhookEvent"),
                                },
                                "dead_letters": INT,
                            }
                        ),
                        "the events, and how many dead letters exist",
                    ),
                    "400": error("invalid query parameter"),
                },
                params=[
                    _query(
                        "dead",
                        {"type": "boolean"},
                        "true: only dead letters; false: none of them; "
                        "absent: every event",
                    ),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    ),
                ],
            )
        },
        "/api/v1/events/{event_id}/replay": {
            "parameters": [
                {
                    "name": "event_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                }
            ],
            "post": _op(
                "process a dead-letter event again (attempts reset, enqueued)",
                {
                    "200": json_response(
                        ref("WebhookEvent"), "the event, pending again"
                    ),
                    "400": error("a body was sent (none is expected)"),
                    "404": error("no such webhook event"),
                    "409": error("the event is already processed or not dead"),
                },
                body=_json_body(obj({}, required=[]), required=False),
            ),
        },
    }


def build_spec() -> dict:
    schemas = dict(SCHEMAS)
    schemas["Readiness"] = obj(
        {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "checks": {"type": "object"},
        }
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "campaignd web role",
            "version": __version__,
            "description": "Provider webhooks, the admin API (/api/v1, bearer "
            "token), health and metrics.",
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
