"""The application service: what the CLI and the admin API both call.

One rule for contacts, wherever they come from (a CSV file, CSV text, JSON
records): the good rows are imported and the bad ones reported by line (the
line a user counts in the file, header = 1; a JSON record's 0-based index);
`strict` refuses the whole source when any row is bad, importing nothing.
Contacts with no good row at all are refused either way (RejectedRows).

CSV is always streamed (contacts.import_csv_file / import_csv_text): the rows
are never all in memory. `strict` costs no second pass: the streamed import
runs in a transaction that is rolled back when a row was bad, so it reports
exactly the errors the lenient import would.

Creating a campaign with its contacts is one transaction: a campaign refused
(a contact lacks ``{city}``) leaves no half-imported contacts behind. A
template variable that no column of the contacts provides is refused before
anything is read into the database, naming every such variable and the
columns there are.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from dataclasses import field

from daemon.domain import campaigns
from daemon.domain import contacts
from daemon.domain.contacts import ProgressFn
from daemon.domain.contacts import verification
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.store.models import Campaign
from daemon.store.models import Contact
from daemon.store.models import database
from daemon.store.models import utcnow

CAMPAIGN_ACTIONS = ("start", "pause", "resume", "cancel", "retry-failed")
# Enough of a file to hold its header line.
_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class CsvFile:
    """A CSV file on disk, read as a stream."""

    path: str | os.PathLike

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class CsvText:
    """CSV already in memory (an API request), named `label` in errors."""

    text: str
    label: str = "contacts"


@dataclass(frozen=True)
class Records:
    """JSON records [{phone, name, ...variables}] (the admin API)."""

    records: list
    label: str = "contacts"


ContactSource = CsvFile | CsvText | Records


@dataclass(frozen=True)
class ImportReport:
    source: str
    created: int
    updated: int
    duplicates_merged: int
    # (line, reason) of every rejected row, in line order.
    errors: list[tuple[int, str]]
    # "utf-8", "utf-16" or "cp1252" (the encoding a file was read in).
    encoding: str = "utf-8"
    # One id per distinct number, first seen first (with_ids only).
    contact_ids: list[int] = field(default_factory=list)

    @property
    def imported(self) -> int:
        """Distinct numbers written (created or updated)."""
        return self.created + self.updated

    def rejected_json(self) -> list[dict]:
        return [{"line": line, "reason": reason} for line, reason in self.errors]


class RejectedRows(InputError):
    """The source is refused: a bad row under `strict`, or no good row at all.

    Nothing was imported; `errors` lists every bad row.
    """

    def __init__(self, source: str, errors: list[tuple[int, str]], strict: bool):
        self.source = source
        self.errors = errors
        self.strict = strict
        rows = f"{len(errors)} row" + ("" if len(errors) == 1 else "s")
        if strict:
            why = f"{rows} rejected (strict: nothing was imported)"
        else:
            why = f"no valid contact ({rows} rejected)"
        super().__init__(f"{source}: {why}")

    def rejected_json(self) -> list[dict]:
        return [{"line": line, "reason": reason} for line, reason in self.errors]


def import_contacts(
    source: ContactSource,
    region: str = "FR",
    *,
    strict: bool = False,
    with_ids: bool = False,
    progress: ProgressFn | None = None,
    check_progress: ProgressFn | None = None,
) -> ImportReport:
    """Upsert the good rows of `source` in one transaction; report the bad.

    RejectedRows (nothing imported) when a row is bad under `strict`, or
    when no row is good. progress / check_progress as in
    contacts.import_csv_file (files only).
    """
    region = contacts.check_region(region)
    # Rolled back by RejectedRows: a strict refusal leaves nothing behind.
    with database.atomic():
        parsed, result = _import(source, region, with_ids, progress, check_progress)
        if parsed.errors and (strict or not result.created + result.updated):
            raise RejectedRows(source.label, parsed.errors, strict)
    return ImportReport(
        source=source.label,
        created=result.created,
        updated=result.updated,
        duplicates_merged=parsed.duplicates_merged,
        errors=list(parsed.errors),
        encoding=parsed.encoding,
        contact_ids=list(result.contact_ids),
    )


def _import(source, region, with_ids, progress, check_progress):
    if isinstance(source, CsvFile):
        return contacts.import_csv_file(
            source.path,
            region,
            with_ids=with_ids,
            progress=progress,
            check_progress=check_progress,
        )
    if isinstance(source, CsvText):
        try:
            return contacts.import_csv_text(source.text, region, with_ids=with_ids)
        except InputError as exc:
            raise InputError(f"{source.label}: {exc}") from None
    if isinstance(source, Records):
        parsed = contacts.parse_records(source.records, region)
        return parsed, contacts.import_rows(parsed.rows)
    raise TypeError(f"not a contact source: {source!r}")


def create_campaign_from(
    name: str,
    message1: str,
    message2: str,
    *,
    source: ContactSource | None = None,
    contact_ids: list[int] = (),
    all_contacts: bool = False,
    region: str = "FR",
    skip_invalid: bool = True,
    strict: bool = False,
    progress: ProgressFn | None = None,
    check_progress: ProgressFn | None = None,
) -> tuple[Campaign, ImportReport | None]:
    """A draft campaign over the contacts of `source` (imported by the rule of
    import_contacts), `contact_ids`, or every contact (`all_contacts`).

    One transaction: a refusal (a bad row under `strict`, a contact lacking a
    template variable) imports nothing and creates nothing.
    """
    fields = campaigns.template_fields(message1) | campaigns.template_fields(message2)
    if all_contacts and (source is not None or contact_ids):
        raise InputError("give either contacts or all contacts, not both")
    if source is not None:
        _check_columns(source, fields)
    if all_contacts and not Contact.select().exists():
        raise InputError("no contacts yet: import some first")
    report = None
    with database.atomic():
        ids = list(contact_ids)
        if source is not None:
            report = import_contacts(
                source,
                region,
                strict=strict,
                with_ids=True,
                progress=progress,
                check_progress=check_progress,
            )
            if not report.contact_ids and not ids:
                where = "the file" if isinstance(source, CsvFile) else "it"
                raise InputError(f"{source.label}: no contacts in {where}")
            ids = list(dict.fromkeys(report.contact_ids + ids))
        if not ids and not all_contacts:
            raise InputError("a campaign needs contacts")
        # None: every contact, read in chunks by create_campaign.
        campaign = campaigns.create_campaign(
            name,
            message1,
            message2,
            None if all_contacts else ids,
            skip_invalid=skip_invalid,
        )
    return campaign, report


def _check_columns(source: ContactSource, fields: set[str]) -> None:
    """InputError naming every template variable no column provides."""
    if not fields:
        return
    provided = _provided_variables(source)
    if provided is None:
        return  # unreadable: the import says why, with its own message
    missing = sorted(fields - set(provided) - {"phone"})
    if not missing:
        return
    what = ", ".join(f"{{{name}}}" for name in missing)
    columns = ", ".join(
        header if variable == header else f"{header} ({{{variable}}})"
        for variable, header in provided.items()
    )
    if len(missing) == 1:
        text = f"template variable {what} is not a column"
    else:
        text = f"template variables {what} are not columns"
    raise InputError(f"{source.label}: {text} of the contacts (columns: {columns})")


def _provided_variables(source: ContactSource) -> dict[str, str] | None:
    """{variable: column} the source's contacts can fill; None if unknown."""
    if isinstance(source, Records):
        if not isinstance(source.records, list):
            return None
        provided: dict[str, str] = {}
        for record in source.records:
            if isinstance(record, dict):
                provided.update((str(k).strip(), str(k).strip()) for k in record)
        return provided
    text = source.text if isinstance(source, CsvText) else _file_head(source.path)
    if text is None:
        return None
    try:
        return contacts.header_variables(text.removeprefix("\ufeff"))
    except InputError:
        return None  # no header, no phone column: the import says it


def _file_head(path) -> str | None:
    """The start of a CSV file as text (its header), decoded as the import
    will decode it; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return None
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings = ("utf-16",)
    else:
        encodings = ("utf-8-sig", "cp1252")
    for encoding in encodings:
        # Incremental: a character cut by the end of the head is no error.
        try:
            return codecs.getincrementaldecoder(encoding)().decode(head, final=False)
        except UnicodeDecodeError:
            continue
    return None


def campaign_action(campaign_id: int, action: str, tasks, reason: str = "") -> dict:
    """start | pause | resume | cancel | retry-failed; extra figures (retried)."""
    if action == "start":
        campaigns.start_campaign(campaign_id, tasks)
    elif action == "pause":
        campaigns.pause_campaign(campaign_id, reason=reason)
    elif action == "resume":
        campaigns.resume_campaign(campaign_id, tasks)
    elif action == "cancel":
        campaigns.cancel_campaign(campaign_id)
    elif action == "retry-failed":
        return {"retried": campaigns.retry_failed(campaign_id, tasks)}
    else:
        raise InputError(f"unknown campaign action {action!r}")
    return {}


def request_verification(
    tasks,
    *,
    contact_ids: list[int] | None = None,
    campaign_id: int | None = None,
    all_unknown: bool = False,
) -> dict:
    """Start number checks (`campaignd verify --campaign | --all`, the admin
    API's verify routes): the contacts given, a campaign's members (a re-check
    of each), or every contact never found valid or invalid. Checks already
    pending are kept; opted-out contacts are left out. Returns what was
    queued and the checks' figures in that scope, with their ETA.
    """
    if (contact_ids is not None) + (campaign_id is not None) + all_unknown != 1:
        raise InputError("give one of: contact ids, a campaign, or all unknown")
    per_minute = tasks.cfg.campaigns.verify_per_minute
    now = tasks.clock()
    if campaign_id is not None:
        campaigns.get_campaign(campaign_id)
        ids = verification.campaign_contact_ids(campaign_id)
    elif all_unknown:
        ids = verification.unknown_contact_ids()
    else:
        ids = list(dict.fromkeys(contact_ids or []))
        if not ids:
            raise InputError("no contact ids given")
        missing = verification.missing_contacts(ids)
        if missing:
            shown = ", ".join(str(i) for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise NotFoundError(f"no contact with id {shown}{more}")
    requested = tasks.request_checks(ids)
    if campaign_id is not None:
        figures = verification.campaign_counts(campaign_id, len(ids), per_minute, now)
    elif all_unknown:
        figures = verification.overall_counts(per_minute, now)
    else:
        figures = verification.contacts_counts(ids, per_minute, now)
    return {
        "queued": len(requested.queued),
        "already_pending": requested.already_pending,
        "opted_out": requested.opted_out,
        "verify_per_minute": per_minute,
        "verification": figures,
    }


def campaign_verification(cfg, summary: dict, now=None) -> dict:
    """The number checks of a campaign's members (`campaign show`, GET
    /api/v1/campaigns/{id}): counts by status, and the ETA while pending."""
    return verification.campaign_counts(
        summary["id"],
        summary.get("contacts", 0),
        cfg.campaigns.verify_per_minute,
        now or utcnow(),
    )
