"""The application service: what the CLI and the admin API both call.

One rule for contact files, wherever they come from: the good rows are
imported, the bad ones reported by line; `strict` refuses the whole file
when any row is bad (nothing imported, nothing created). A file with no good
row at all is refused either way. Creating a campaign with its contacts is
one transaction: a campaign refused (say, a contact lacks ``{city}``)
leaves no half-imported contacts behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

from daemon.domain import campaigns
from daemon.domain.contacts import ParsedCsv
from daemon.domain.contacts import ProgressFn
from daemon.domain.contacts import import_rows
from daemon.errors import InputError
from daemon.store.models import database

CAMPAIGN_ACTIONS = ("start", "pause", "resume", "cancel", "retry-failed")


class RejectedRows(InputError):
    """The file is refused: no good row, or a bad one under `strict`."""

    def __init__(self, errors: list[tuple[int, str]], strict: bool):
        self.errors = errors
        self.strict = strict
        what = "row" if len(errors) == 1 else "rows"
        if strict:
            message = f"{len(errors)} {what} rejected (strict: nothing imported)"
        else:
            message = f"no valid contact ({len(errors)} rejected)"
        super().__init__(message)


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    duplicates_merged: int = 0
    imported: int = 0
    # One id per imported row, in row order.
    contact_ids: list[int] = field(default_factory=list)
    # (line, reason) of every rejected row.
    errors: list[tuple[int, str]] = field(default_factory=list)

    def errors_json(self) -> list[dict]:
        return [{"line": line, "reason": reason} for line, reason in self.errors]


def import_contacts(
    parsed: ParsedCsv | None,
    *,
    strict: bool = False,
    progress: ProgressFn | None = None,
) -> ImportReport:
    """Upsert the good rows of `parsed`; raise RejectedRows per the rule above."""
    if parsed is None:
        return ImportReport()
    if parsed.errors and (strict or not parsed.rows):
        raise RejectedRows(parsed.errors, strict)
    result = import_rows(parsed.rows, progress=progress)
    return ImportReport(
        created=result.created,
        updated=result.updated,
        duplicates_merged=parsed.duplicates_merged,
        imported=len(parsed.rows),
        contact_ids=result.contact_ids,
        errors=list(parsed.errors),
    )


def create_campaign(
    name: str,
    message1: str,
    message2: str,
    *,
    parsed: ParsedCsv | None = None,
    contact_ids: list[int] = (),
    skip_invalid: bool,
    strict: bool = False,
    progress: ProgressFn | None = None,
):
    """Import `parsed` (if any) and create the campaign over its contacts and
    `contact_ids`, in one transaction: (campaign, ImportReport)."""
    with database.atomic():
        report = import_contacts(parsed, strict=strict, progress=progress)
        ids = list(dict.fromkeys(report.contact_ids + list(contact_ids)))
        if not ids:
            raise InputError("a campaign needs contacts")
        campaign = campaigns.create_campaign(
            name, message1, message2, ids, skip_invalid=skip_invalid
        )
    return campaign, report


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
