"""The admin API under /api/v1 (bearer token; disabled when web.api_token is empty).

Resources only translate HTTP to the application service (daemon/app/service.py,
which the CLI calls too: one rule for contacts) and the domain functions; the
domain errors map to statuses in app.py (InputError 400, NotFoundError 404,
StateError 409). Bodies are strict: unknown fields and wrong
types are a 400 that names the field, so a typo never passes silently.
"""

from __future__ import annotations

import hmac

import falcon

from daemon.app import service
from daemon.domain import campaigns
from daemon.domain import contacts as contacts_mod
from daemon.domain import events
from daemon.domain.contacts import verification
from daemon.errors import NotFoundError
from daemon.roles.web import bad_request
from daemon.roles.web import json_kind
from daemon.roles.web import parse_json_object
from daemon.roles.web import read_body
from daemon.roles.web.auth_limit import FAILURES_ALLOWED
from daemon.roles.web.auth_limit import WINDOW_S
from daemon.roles.web.auth_limit import FailedAuth
from daemon.roles.web.openapi import MAX_ID
from daemon.roles.web.openapi import MESSAGE_STATUSES
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import iso_z

PREFIX = "/api/v1"
DEFAULT_PAGE = 100
MAX_PAGE = 1000
DEFAULT_REGION = "FR"
MAX_VERIFY_IDS = 100_000


class ApiAuth:
    """Middleware: resources marked `admin_api` need `Authorization: Bearer <token>`."""

    def __init__(self, token: str, failures: FailedAuth):
        self.token = token.encode()
        self.failures = failures

    def process_resource(self, req, resp, resource, params) -> None:
        if not getattr(resource, "admin_api", False):
            return
        if not self.token:
            raise falcon.HTTPForbidden(
                title="Admin API disabled",
                description="set web.api_token to enable /api/v1",
            )
        address = req.remote_addr or ""
        wait_s = self.failures.retry_after(address)
        if wait_s:
            raise falcon.HTTPTooManyRequests(
                title="Too many wrong tokens",
                description=(
                    f"{FAILURES_ALLOWED} wrong tokens from {address} within"
                    f" {WINDOW_S:.0f} s: try again in {wait_s} s"
                ),
                retry_after=wait_s,
            )
        scheme, _, given = (req.auth or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            self.token, given.strip().encode("utf-8", "replace")
        ):
            self.failures.failed(address, "admin API")
            raise falcon.HTTPUnauthorized(
                title="Unauthorized",
                description="send Authorization: Bearer <web.api_token>",
                challenges=["Bearer"],
            )
        self.failures.succeeded(address)


class InvalidContacts(falcon.HTTPBadRequest):
    """400 listing every rejected contact row (nothing was imported)."""

    def __init__(self, refused: service.RejectedRows):
        super().__init__(title="Invalid contacts", description=str(refused))
        self.errors = refused.rejected_json()

    def to_dict(self, obj_type=dict):
        out = super().to_dict(obj_type)
        out["errors"] = self.errors
        return out


# --- body fields -----------------------------------------------------------------


class Body:
    """Typed, named access to a JSON object body; every mistake is a 400."""

    def __init__(self, data: dict, allowed: set[str]):
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise bad_request(
                "Invalid body",
                f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
            )
        self.data = data

    @classmethod
    def read(cls, req: falcon.Request, allowed: set[str], *, optional=False) -> Body:
        raw = read_body(req)
        if optional and not raw.strip():
            return cls({}, allowed)
        return cls(parse_json_object(raw), allowed)

    def text(self, name: str, *, required=False, max_len=4096, default="") -> str:
        value = self.data.get(name)
        if value is None:
            if required:
                raise bad_request("Invalid body", f"field {name!r} is required")
            return default
        if not isinstance(value, str):
            raise bad_request(
                "Invalid body",
                f"field {name!r} must be a string, got {json_kind(value)}",
            )
        if len(value) > max_len:
            raise bad_request(
                "Invalid body", f"field {name!r} is longer than {max_len} characters"
            )
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise bad_request("Invalid body", f"field {name!r} must be true or false")
        return value

    def ids(self, name: str) -> list[int]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ID
            for v in value
        ):
            raise bad_request(
                "Invalid body", f"field {name!r} must be a list of positive ids"
            )
        return value

    def contacts(self) -> service.ContactSource | None:
        """The `contacts` field: CSV text or a list of {phone, name, ...}."""
        value = self.data.get("contacts")
        if value is None:
            return None
        if isinstance(value, str):
            return service.CsvText(value)
        if isinstance(value, list):
            return service.Records(value)
        raise bad_request(
            "Invalid body",
            "field 'contacts' must be CSV text or a list of objects, "
            f"got {json_kind(value)}",
        )


_NOTHING_IMPORTED = {"created": 0, "updated": 0, "duplicates_merged": 0, "errors": []}


def _import_json(report: service.ImportReport) -> dict:
    return {
        "created": report.created,
        "updated": report.updated,
        "duplicates_merged": report.duplicates_merged,
        "errors": report.rejected_json(),
    }


# --- campaigns -----------------------------------------------------------------

_CREATE_FIELDS = {
    "name",
    "message1",
    "message2",
    "contacts",
    "contact_ids",
    "region",
    "skip_invalid",
    "start",
    "strict",
}


class CampaignCollection:
    """GET (list) and POST (create) /api/v1/campaigns"""

    admin_api = True
    uses_database = True

    def __init__(self, tasks):
        self.tasks = tasks

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"campaigns": campaigns.list_campaigns()}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = Body.read(req, _CREATE_FIELDS)
        name = body.text("name", required=True, max_len=200)
        message1 = body.text("message1", required=True)
        message2 = body.text("message2", required=True)
        region = body.text("region", default=DEFAULT_REGION, max_len=8)
        skip_invalid = body.flag("skip_invalid", True)
        start = body.flag("start", False)
        strict = body.flag("strict", False)
        extra_ids = body.ids("contact_ids")
        source = body.contacts()
        if source is None and not extra_ids:
            raise bad_request(
                "Invalid body", "a campaign needs 'contacts' or 'contact_ids'"
            )
        # The same function and rule as `campaignd campaign create`.
        try:
            campaign, report = service.create_campaign_from(
                name,
                message1,
                message2,
                source=source,
                contact_ids=extra_ids,
                region=region,
                skip_invalid=skip_invalid,
                strict=strict,
            )
        except service.RejectedRows as exc:
            raise InvalidContacts(exc) from None
        if start:
            campaigns.start_campaign(campaign.id, self.tasks)
        resp.status = falcon.HTTP_201
        resp.location = f"{PREFIX}/campaigns/{campaign.id}"
        imported = _import_json(report) if report else dict(_NOTHING_IMPORTED)
        resp.media = {**campaigns.campaign_summary(campaign.id), "import": imported}


class CampaignItem:
    """GET /api/v1/campaigns/{campaign_id}, with the members' number checks"""

    admin_api = True
    uses_database = True

    def __init__(self, tasks):
        self.tasks = tasks

    def on_get(self, req, resp, campaign_id: int) -> None:
        summary = campaigns.campaign_summary(campaign_id)
        # The same figures as `campaignd campaign show`.
        verification = service.campaign_verification(
            self.tasks.cfg, summary, self.tasks.clock()
        )
        resp.media = {**summary, "verification": verification}


class CampaignVerify:
    """POST /api/v1/campaigns/{campaign_id}/verify: check every member's number"""

    admin_api = True
    uses_database = True

    def __init__(self, tasks):
        self.tasks = tasks

    def on_post(self, req, resp, campaign_id: int) -> None:
        Body.read(req, set(), optional=True)
        # The same function as `campaignd verify --campaign ID`.
        resp.media = service.request_verification(self.tasks, campaign_id=campaign_id)
        resp.status = falcon.HTTP_202


class CampaignAction:
    """POST /api/v1/campaigns/{campaign_id}/{start,pause,resume,cancel,retry-failed}"""

    admin_api = True
    uses_database = True
    ACTIONS = ("start", "pause", "resume", "cancel", "retry-failed")

    def __init__(self, tasks, action: str):
        assert action in self.ACTIONS, action
        self.tasks = tasks
        self.action = action

    def on_post(self, req, resp, campaign_id: int) -> None:
        allowed = {"reason"} if self.action == "pause" else set()
        body = Body.read(req, allowed, optional=True)
        reason = ""
        if self.action == "pause":
            reason = body.text("reason", max_len=500) or "paused from the admin API"
        extra = service.campaign_action(campaign_id, self.action, self.tasks, reason)
        resp.media = {**campaigns.campaign_summary(campaign_id), **extra}


# --- contacts ------------------------------------------------------------------


def find_contact(ref: str) -> Contact:
    """A contact by numeric id or by E.164 phone ('+' first; %2B in a URL)."""
    if ref.isdigit() and ref.isascii():
        contact_id = int(ref) if len(ref) <= 10 else MAX_ID + 1
        contact = (
            Contact.get_or_none(Contact.id == contact_id)
            if contact_id <= MAX_ID
            else None
        )
    elif ref.startswith("+"):
        contact = Contact.get_or_none(
            Contact.phone == contacts_mod.normalize_phone(ref, DEFAULT_REGION)
        )
    else:
        raise bad_request(
            "Invalid contact reference",
            "use a numeric contact id or an E.164 phone number such as +33612345678",
        )
    if contact is None:
        raise NotFoundError(f"contact {ref} does not exist")
    return contact


def contact_dict(contact: Contact) -> dict:
    memberships = (
        CampaignContact.select()
        .where(CampaignContact.contact == contact.id)
        .order_by(CampaignContact.campaign)
    )
    return {
        "id": contact.id,
        "phone": contact.phone,
        "name": contact.name,
        "variables": contact.variables or {},
        "wa_status": contact.wa_status,
        "wa_checked_at": iso_z(contact.wa_checked_at),
        "opted_out": contact.opted_out_at is not None,
        "opted_out_at": iso_z(contact.opted_out_at),
        "created_at": iso_z(contact.created_at),
        "check": verification.check_dict(contact.id),
        "campaigns": [
            {
                "campaign_id": m.campaign_id,
                "state": m.state,
                "message1_sent_at": iso_z(m.message1_sent_at),
                "interacted_at": iso_z(m.interacted_at),
            }
            for m in memberships
        ],
    }


class ContactImport:
    """POST /api/v1/contacts/import: JSON {contacts, region} or a text/csv body."""

    admin_api = True
    uses_database = True

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.content_type and req.content_type.startswith("text/csv"):
            region = req.get_param("region") or DEFAULT_REGION
            strict = req.get_param_as_bool("strict", default=False)
            contacts_mod.check_region(region)
            text, _ = contacts_mod.decode_csv_bytes(read_body(req), "CSV body")
            source = service.CsvText(text, "CSV body")
        else:
            body = Body.read(req, {"contacts", "region", "strict"})
            region = body.text("region", default=DEFAULT_REGION, max_len=8)
            strict = body.flag("strict", False)
            source = body.contacts()
            if source is None:
                raise bad_request("Invalid body", "field 'contacts' is required")
        # The same function and rule as `campaignd contacts import`.
        try:
            report = service.import_contacts(
                source, region, strict=strict, with_ids=True
            )
        except service.RejectedRows as exc:
            raise InvalidContacts(exc) from None
        resp.media = {**_import_json(report), "contact_ids": report.contact_ids}


class ContactItem:
    """GET /api/v1/contacts/{ref}"""

    admin_api = True
    uses_database = True

    def on_get(self, req, resp, ref: str) -> None:
        resp.media = contact_dict(find_contact(ref))


class ContactsVerify:
    """POST /api/v1/contacts/verify: {"contact_ids": [...]} or {"all_unknown": true}"""

    admin_api = True
    uses_database = True

    def __init__(self, tasks):
        self.tasks = tasks

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = Body.read(req, {"contact_ids", "all_unknown"})
        given = set(body.data)
        if len(given) != 1:
            raise bad_request(
                "Invalid body", "give either 'contact_ids' or 'all_unknown': true"
            )
        if "all_unknown" in given:
            if not body.flag("all_unknown", False):
                raise bad_request(
                    "Invalid body", "field 'all_unknown' must be true when given"
                )
            # The same function as `campaignd verify --all`.
            result = service.request_verification(self.tasks, all_unknown=True)
        else:
            ids = body.ids("contact_ids")
            if not ids:
                raise bad_request("Invalid body", "field 'contact_ids' is empty")
            if len(ids) > MAX_VERIFY_IDS:
                raise bad_request(
                    "Invalid body",
                    f"field 'contact_ids' holds more than {MAX_VERIFY_IDS} ids",
                )
            result = service.request_verification(self.tasks, contact_ids=ids)
        resp.media = result
        resp.status = falcon.HTTP_202


class ContactOptOut:
    """POST /api/v1/contacts/{ref}/opt-out"""

    admin_api = True
    uses_database = True

    def on_post(self, req, resp, ref: str) -> None:
        body = Body.read(req, {"reason"}, optional=True)
        reason = body.text("reason", max_len=500) or "admin API"
        contact = find_contact(ref)
        campaigns.opt_out_contact(contact, reason)
        resp.media = contact_dict(Contact.get_by_id(contact.id))


# --- messages ------------------------------------------------------------------


class MessageCollection:
    """GET /api/v1/messages, filtered (campaign, contact, status, kind) and paged."""

    admin_api = True
    uses_database = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ids = {
            param: req.get_param_as_int(param, min_value=1, max_value=MAX_ID)
            for param in ("campaign_id", "contact_id")
        }
        status = req.get_param("status")
        if status is not None and status not in MESSAGE_STATUSES:
            raise falcon.HTTPInvalidParam(
                f"must be one of {', '.join(MESSAGE_STATUSES)}", "status"
            )
        kind = req.get_param_as_int("kind", min_value=1, max_value=2)
        limit = req.get_param_as_int(
            "limit", min_value=1, max_value=MAX_PAGE, default=DEFAULT_PAGE
        )
        cursor = req.get_param_as_int("cursor", min_value=0, max_value=MAX_ID)
        offset = req.get_param_as_int("offset", min_value=0, max_value=10**9)
        if cursor is not None and offset is not None:
            raise bad_request("Invalid query", "use either 'cursor' or 'offset'")
        rows = campaigns.list_messages(
            **ids,
            status=status,
            kind=kind,
            after_id=cursor,
            offset=offset,
            limit=limit,
        )
        resp.media = {
            "messages": [campaigns.message_dict(m) for m in rows],
            "next_cursor": rows[-1].id if len(rows) == limit else None,
        }


# --- webhook events --------------------------------------------------------------


class EventCollection:
    """GET /api/v1/events: stored webhook events, newest first (?dead=true)."""

    admin_api = True
    uses_database = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        dead = req.get_param_as_bool("dead")
        limit = req.get_param_as_int(
            "limit", min_value=1, max_value=MAX_PAGE, default=DEFAULT_PAGE
        )
        rows = events.list_events(dead=dead, limit=limit)
        resp.media = {"events": rows, "dead_letters": events.dead_count()}


class EventReplay:
    """POST /api/v1/events/{event_id}/replay: process a dead letter again."""

    admin_api = True
    uses_database = True

    def __init__(self, tasks, cfg=None):
        self.tasks = tasks
        self.cfg = cfg

    def on_post(self, req, resp, event_id: str) -> None:
        if not (event_id.isascii() and event_id.isdigit() and len(event_id) <= 10):
            raise NotFoundError(f"webhook event {event_id} does not exist")
        if not 1 <= int(event_id) <= MAX_ID:
            raise NotFoundError(f"webhook event {event_id} does not exist")
        Body.read(req, set(), optional=True)
        event = events.replay(int(event_id), self.tasks, self.cfg)
        resp.media = events.event_dict(event)
