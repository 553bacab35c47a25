"""The OpenAPI document's parts shared by several paths: the component
schemas (`SCHEMAS`) and the small builders (daemon/roles/web/openapi.py
puts the paths together)."""

from __future__ import annotations

from daemon.store.models import CheckStatus
from daemon.store.models import MessageStatus

# inbound ids are INTEGER (int4 on PostgreSQL): larger ones can never exist.
MAX_ID = 2**31 - 1
MESSAGE_STATUSES = MessageStatus.ALL
CAMPAIGN_STATUSES = ("draft", "running", "paused", "completed", "cancelled")

STR = {"type": "string"}
INT = {"type": "integer"}
TIME = {"type": ["string", "null"], "format": "date-time"}
COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(schema: dict, description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def error(description: str) -> dict:
    return json_response(ref("Error"), description)


def obj(properties: dict, required=None, *, extra=False) -> dict:
    out = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    if not extra:
        out["additionalProperties"] = False
    return out


_CAMPAIGN_FIELDS = {
    "id": INT,
    "name": STR,
    "status": {"type": "string", "enum": list(CAMPAIGN_STATUSES)},
    "status_reason": STR,
    "message1": STR,
    "message2": STR,
    "created_at": TIME,
    "started_at": TIME,
    "finished_at": TIME,
    "contacts": INT,
}

# The number checks in a scope (a campaign's members, contacts): counts by
# status, never requested, and when the pending ones should be done.
VERIFICATION = obj(
    {
        **{status: INT for status in CheckStatus.ALL},
        "unchecked": INT,
        "eta": TIME,
    }
)
NUMBER_CHECK = obj(
    {
        "status": {"type": "string", "enum": list(CheckStatus.ALL)},
        "requested_at": TIME,
        "due_at": TIME,
        "checked_at": TIME,
        "attempts": INT,
        "error": {"type": ["string", "null"]},
    }
)

_IMPORT_ERROR = obj({"line": INT, "reason": STR})
# Contacts: a bad row refuses them all (default: import the good rows).
STRICT = {"type": "boolean", "default": False}

SCHEMAS = {
    "Error": {
        "type": "object",
        "properties": {
            "title": STR,
            "description": STR,
            "errors": {"type": "array", "items": _IMPORT_ERROR},
        },
        "required": ["title"],
    },
    "Verification": VERIFICATION,
    "NumberCheck": NUMBER_CHECK,
    "VerificationStarted": obj(
        {
            "queued": INT,
            "already_pending": INT,
            "opted_out": INT,
            "verify_per_minute": {"type": "number"},
            "verification": ref("Verification"),
        }
    ),
    "WebhookAck": obj({"stored": INT, "duplicates": INT}),
    "CampaignListItem": obj(_CAMPAIGN_FIELDS, extra=True),
    "CampaignSummary": obj(
        {
            **_CAMPAIGN_FIELDS,
            "members": COUNTS,
            "messages": obj({"message1": COUNTS, "message2": COUNTS}),
            "retried": INT,
            "import": ref("ImportReport"),
            # Sends whose outcome was unknown: waiting for evidence, re-sent
            # without it (provider.unconfirmed = resend), failed by policy.
            "unconfirmed": obj({"waiting": INT, "resent": INT, "failed": INT}),
            # GET /api/v1/campaigns/{id} only: the members' number checks.
            "verification": ref("Verification"),
        },
        required=[*_CAMPAIGN_FIELDS, "members", "messages"],
    ),
    "ImportReport": obj(
        {
            "created": INT,
            "updated": INT,
            "duplicates_merged": INT,
            "errors": {"type": "array", "items": _IMPORT_ERROR},
            "contact_ids": {"type": "array", "items": INT},
        },
        required=["created", "updated", "duplicates_merged", "errors"],
    ),
    "Contact": obj(
        {
            "id": INT,
            "phone": STR,
            "name": STR,
            "variables": {"type": "object", "additionalProperties": STR},
            "wa_status": STR,
            "wa_checked_at": TIME,
            "opted_out": {"type": "boolean"},
            "opted_out_at": TIME,
            "created_at": TIME,
            # The contact's number check (null: never requested).
            "check": {"oneOf": [{"type": "null"}, ref("NumberCheck")]},
            "campaigns": {
                "type": "array",
                "items": obj(
                    {
                        "campaign_id": INT,
                        "state": STR,
                        "message1_sent_at": TIME,
                        "interacted_at": TIME,
                    }
                ),
            },
        }
    ),
    "Message": obj(
        {
            "id": INT,
            "campaign_id": INT,
            "contact_id": INT,
            "phone": STR,
            "kind": {"type": "integer", "enum": [1, 2]},
            "status": {"type": "string", "enum": list(MESSAGE_STATUSES)},
            "attempts": INT,
            "error": {"type": ["string", "null"]},
            "idempotency_key": STR,
            "provider_id": {"type": ["string", "null"]},
            "created_at": TIME,
            "sent_at": TIME,
            "delivered_at": TIME,
            "read_at": TIME,
            "failed_at": TIME,
            "next_attempt_at": TIME,
        },
        required=["id", "campaign_id", "contact_id", "kind", "status"],
        extra=True,
    ),
    "WebhookEvent": obj(
        {
            "id": INT,
            "provider": STR,
            "event_type": STR,
            "state": {"type": "string", "enum": ["pending", "processed", "dead"]},
            "received_at": TIME,
            "processed_at": TIME,
            "dead_at": TIME,
            "attempts": INT,
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
                    "properties": {"phone": STR, "name": STR},
                    "additionalProperties": {
                        "type": ["string", "number", "boolean", "null"]
                    },
                },
            },
        ],
    },
}
