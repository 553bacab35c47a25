"""The OpenAPI 3.1 description of every route the web role serves.

Served at GET /api/v1/openapi.json; the tests validate real responses against
it (schemathesis), so a route or field added without updating this file fails
the suite.
"""

from __future__ import annotations

from daemon import __version__
from daemon.store.models import MessageStatus

# inbound ids are INTEGER (int4 on PostgreSQL): larger ones can never exist.
MAX_ID = 2**31 - 1
MESSAGE_STATUSES = MessageStatus.ALL
CAMPAIGN_STATUSES = ("draft", "running", "paused", "completed", "cancelled")

_STR = {"type": "string"}
_INT = {"type": "integer"}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


def _obj(properties: dict, required=None, *, extra=False) -> dict:
    out = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    if not extra:
        out["additionalProperties"] = False
    return out


_CAMPAIGN_FIELDS = {
    "id": _INT,
    "name": _STR,
    "status": {"type": "string", "enum": list(CAMPAIGN_STATUSES)},
    "status_reason": _STR,
    "message1": _STR,
    "message2": _STR,
    "created_at": _TIME,
    "started_at": _TIME,
    "finished_at": _TIME,
    "contacts": _INT,
}

_IMPORT_ERROR = _obj({"line": _INT, "reason": _STR})
# Contacts: a bad row refuses them all (default: import the good rows).
_STRICT = {"type": "boolean", "default": False}

SCHEMAS = {
    "Error": {
        "type": "object",
        "properties": {
            "title": _STR,
            "description": _STR,
            "errors": {"type": "array", "items": _IMPORT_ERROR},
        },
        "required": ["title"],
    },
    "WebhookAck": _obj({"stored": _INT, "duplicates": _INT}),
    "CampaignListItem": _obj(_CAMPAIGN_FIELDS, extra=True),
    "CampaignSummary": _obj(
        {
            **_CAMPAIGN_FIELDS,
            "members": _COUNTS,
            "messages": _obj({"message1": _COUNTS, "message2": _COUNTS}),
            "retried": _INT,
            "import": _ref("ImportReport"),
            # Sends whose outcome was unknown: waiting for evidence, re-sent
            # without it (provider.unconfirmed = resend), failed by policy.
            "unconfirmed": _obj({"waiting": _INT, "resent": _INT, "failed": _INT}),
        },
        required=[*_CAMPAIGN_FIELDS, "members", "messages"],
    ),
    "ImportReport": _obj(
        {
            "created": _INT,
            "updated": _INT,
            "duplicates_merged": _INT,
            "errors": {"type": "array", "items": _IMPORT_ERROR},
            "contact_ids": {"type": "array", "items": _INT},
        },
        required=["created", "updated", "duplicates_merged", "errors"],
    ),
    "Contact": _obj(
        {
            "id": _INT,
            "phone": _STR,
            "name": _STR,
            "variables": {"type": "object", "additionalProperties": _STR},
            "wa_status": _STR,
            "wa_checked_at": _TIME,
            "opted_out": {"type": "boolean"},
            "opted_out_at": _TIME,
            "created_at": _TIME,
            "campaigns": {
                "type": "array",
                "items": _obj(
                    {
                        "campaign_id": _INT,
                        "state": _STR,
                        "message1_sent_at": _TIME,
                        "interacted_at": _TIME,
                    }
                ),
            },
        }
    ),
    "Message": _obj(
        {
            "id": _INT,
            "campaign_id": _INT,
            "contact_id": _INT,
            "phone": _STR,
            "kind": {"type": "integer", "enum": [1, 2]},
            "status": {"type": "string", "enum": list(MESSAGE_STATUSES)},
            "attempts": _INT,
            "error": {"type": ["string", "null"]},
            "idempotency_key": _STR,
            "provider_id": {"type": ["string", "null"]},
            "created_at": _TIME,
            "sent_at": _TIME,
            "delivered_at": _TIME,
            "read_at": _TIME,
            "failed_at": _TIME,
            "next_attempt_at": _TIME,
        },
        required=["id", "campaign_id", "contact_id", "kind", "status"],
        extra=True,
    ),
    "WebhookEvent": _obj(
        {
            "id": _INT,
            "provider": _STR,
            "event_type": _STR,
            "state": {"type": "string", "enum": ["pending", "processed", "dead"]},
            "received_at": _TIME,
            "processed_at": _TIME,
            "dead_at": _TIME,
            "attempts": _INT,
            "last_error": {"type": ["string", "null"]},
            "result": {"type": ["string", "null"]},
        }
    ),
    "ContactsInput": {
        "description": "CSV text (header line first, a 'phone' column) or a list "
        "of {phone, name, ...variables} objects",
        "oneOf": [
            {"type": "string", "maxLength": 1_000_000},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"phone": _STR, "name": _STR},
                    "additionalProperties": {
                        "type": ["string", "number", "boolean", "null"]
                    },
                },
            },
        ],
    },
}

_AUTH_ERRORS = {
    "401": _error("missing or wrong bearer token"),
    "403": _error("admin API disabled (web.api_token is empty)"),
}
_COMMON_ERRORS = {
    "413": _error("body larger than web.max_body_bytes"),
    "503": _error("the database cannot answer; retry later (Retry-After)"),
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
    "200": _json(_ref("WebhookAck"), "every event stored (or already stored)"),
    "400": _error("not a JSON object, invalid UTF-8, or nested too deeply"),
    "401": _error("wrong or missing secret or signature"),
}


def _action(name: str, summary: str, body=None) -> dict:
    return {
        "parameters": [_CAMPAIGN_ID],
        "post": _op(
            summary,
            {
                "200": _json(_ref("CampaignSummary"), "the campaign after the change"),
                "400": _error("invalid body"),
                "404": _error("no such campaign"),
                "409": _error(f"the campaign's state does not allow {name}"),
            },
            body=body,
        ),
    }


def _paths() -> dict:
    summary_ok = _json(_ref("CampaignSummary"), "the campaign with live counters")
    create_body = _json_body(
        _obj(
            {
                "name": {"type": "string", "minLength": 1, "maxLength": 200},
                "message1": {"type": "string", "minLength": 1, "maxLength": 4096},
                "message2": {"type": "string", "minLength": 1, "maxLength": 4096},
                "contacts": _ref("ContactsInput"),
                "contact_ids": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                },
                "region": {"type": "string", "default": "FR", "maxLength": 8},
                "skip_invalid": {"type": "boolean", "default": True},
                "start": {"type": "boolean", "default": False},
                "strict": _STRICT,
            },
            required=["name", "message1", "message2"],
        )
    )
    reason_body = _json_body(
        _obj({"reason": {"type": "string", "maxLength": 500}}, required=[]),
        required=False,
    )
    return {
        "/webhooks/wassenger": {
            "post": _op(
                "Wassenger webhook: store every event, then answer",
                _WEBHOOK_RESPONSES,
                admin=False,
                body=_WEBHOOK_BODY,
                params=[_query("token", _STR, "shared secret (or X-Webhook-Secret)")],
            )
        },
        "/webhooks/whatsapp": {
            "get": {
                "summary": "Meta verification handshake",
                "parameters": [
                    _query("hub.mode", _STR),
                    _query("hub.verify_token", _STR),
                    _query("hub.challenge", _STR),
                ],
                "responses": {
                    "200": {
                        "description": "the challenge, echoed",
                        "content": {"text/plain": {"schema": _STR}},
                    },
                    "403": _error("wrong mode or verify token"),
                },
            },
            "post": _op(
                "Meta Cloud API webhook: store every entry, then answer",
                _WEBHOOK_RESPONSES,
                admin=False,
                body=_WEBHOOK_BODY,
                params=[_query("token", _STR, "shared secret when no app secret")],
            ),
        },
        "/healthz": {
            "get": {
                "summary": "the process serves requests",
                "responses": {"200": _json(_obj({"status": _STR}), "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "the database and the queue answer",
                "responses": {
                    "200": _json(_ref("Readiness"), "ready"),
                    "503": _json(_ref("Readiness"), "not ready; checks say why"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of every campaignd process",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": _STR}},
                    }
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/api/v1/campaigns": {
            "get": _op(
                "list campaigns",
                {
                    "200": _json(
                        _obj(
                            {
                                "campaigns": {
                                    "type": "array",
                                    "items": _ref("CampaignListItem"),
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
                    "201": _json(_ref("CampaignSummary"), "created"),
                    "400": _error("invalid body, template or contacts"),
                    "404": _error("a contact id does not exist"),
                },
                body=create_body,
            ),
        },
        "/api/v1/campaigns/{campaign_id}": {
            "parameters": [_CAMPAIGN_ID],
            "get": _op(
                "one campaign with live counters",
                {"200": summary_ok, "404": _error("no such campaign")},
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
        "/api/v1/contacts/import": {
            "post": _op(
                "import contacts (upsert by phone)",
                {
                    "200": _json(_ref("ImportReport"), "imported"),
                    "400": _error(
                        "no valid contact, a bad row with strict (nothing "
                        "imported; every bad row in errors), or an invalid body"
                    ),
                },
                body={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _obj(
                                {
                                    "contacts": _ref("ContactsInput"),
                                    "region": {"type": "string", "maxLength": 8},
                                    "strict": _STRICT,
                                },
                                required=["contacts"],
                            )
                        },
                        "text/csv": {"schema": _STR},
                    },
                },
                params=[
                    _query("region", _STR, "default region for text/csv bodies"),
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
                    "200": _json(_ref("Contact"), "the contact"),
                    "400": _error("not an id nor an E.164 phone"),
                    "404": _error("no such contact"),
                },
            ),
        },
        "/api/v1/contacts/{ref}/opt-out": {
            "parameters": [_CONTACT_REF],
            "post": _op(
                "opt a contact out of every campaign, now and later",
                {
                    "200": _json(_ref("Contact"), "the contact, opted out"),
                    "400": _error("invalid body or reference"),
                    "404": _error("no such contact"),
                },
                body=reason_body,
            ),
        },
        "/api/v1/messages": {
            "get": _op(
                "messages, oldest first, filtered and paged",
                {
                    "200": _json(
                        _obj(
                            {
                                "messages": {"type": "array", "items": _ref("Message")},
                                "next_cursor": {"type": ["integer", "null"]},
                            }
                        ),
                        "a page; pass next_cursor as cursor for the next one",
                    ),
                    "400": _error("invalid query parameter"),
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
                    "200": _json(
                        _obj(
                            {
                                "events": {
                                    "type": "array",
                                    "items": _ref("WebhookEvent"),
                                },
                                "dead_letters": _INT,
                            }
                        ),
                        "the events, and how many dead letters exist",
                    ),
                    "400": _error("invalid query parameter"),
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
                    "200": _json(_ref("WebhookEvent"), "the event, pending again"),
                    "400": _error("a body was sent (none is expected)"),
                    "404": _error("no such webhook event"),
                    "409": _error("the event is already processed or not dead"),
                },
                body=_json_body(_obj({}, required=[]), required=False),
            ),
        },
    }


def build_spec() -> dict:
    schemas = dict(SCHEMAS)
    schemas["Readiness"] = _obj(
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
