"""Operator commands on the database itself: contacts, campaigns, verification.

They work with the daemon up or down: each opens the database (applying any
pending migration), does its work in short transactions, and enqueues what
the workers must do on the configured queues, where a stopped daemon finds
it when it starts. Every command prints a readable report, or JSON with
``--json``; errors are raised (InputError, NotFoundError, StateError) and
cli.py prints them as one line with exit code 1.

``contacts import`` imports the valid rows of a file in one transaction and
lists every rejected row with its line number and reason; any rejected row
makes the exit code 1 (the valid rows stay imported). A fatal error (an
unreadable file, no phone column, malformed CSV) imports nothing.
``campaign create --contacts`` is stricter: one rejected row, or a template
variable some contact lacks, creates nothing and imports nothing.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from daemon.app import service
from daemon.config import Config
from daemon.domain import campaigns
from daemon.domain.contacts import ImportResult
from daemon.domain.contacts import ParsedCsv
from daemon.domain.contacts import import_csv_file
from daemon.domain.contacts import import_rows
from daemon.domain.contacts import normalize_phone
from daemon.domain.contacts import parse_csv_file
from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.store.db import open_database
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import WaStatus
from daemon.store.models import iso_z
from daemon.store.models import utcnow

# Files smaller than this parse before anyone could read a progress bar.
PROGRESS_MIN_BYTES = 512 * 1024


def contacts(cfg: Config, args) -> int:
    """`campaignd contacts import|list|opt-out`."""
    with _database(cfg):
        if args.action == "import":
            return _contacts_import(args)
        if args.action == "list":
            return _contacts_list(args)
        if args.action == "opt-out":
            return _contacts_opt_out(args)
    raise AssertionError(f"unhandled contacts action {args.action}")


def campaign(cfg: Config, args) -> int:
    """`campaignd campaign create|list|show|start|pause|resume|cancel|retry-failed`."""
    with _database(cfg) as db:
        if args.action == "create":
            return _campaign_create(cfg, args, db)
        if args.action == "list":
            return _campaign_list(args)
        if args.action == "show":
            _print_summary(args, campaigns.campaign_summary(args.id))
            return EXIT_OK
        if args.action in ("pause", "cancel"):
            service.campaign_action(
                args.id, args.action, None, reason="paused by the operator"
            )
            _print_summary(args, campaigns.campaign_summary(args.id))
            return EXIT_OK
        if args.action in ("start", "resume", "retry-failed"):
            return _campaign_enqueueing_action(cfg, args)
    raise AssertionError(f"unhandled campaign action {args.action}")


def verify(cfg: Config, args) -> int:
    """`campaignd verify --phone P | --campaign ID | --all`."""
    with _database(cfg):
        if args.phone:
            return _verify_phone(cfg, args)
        if args.campaign is not None:
            campaigns.get_campaign(args.campaign)
            # The operator asked about this campaign: re-check every member.
            ids = [
                m.contact_id
                for m in CampaignContact.select(CampaignContact.contact)
                .join(Contact)
                .where(
                    CampaignContact.campaign == args.campaign,
                    Contact.opted_out_at.is_null(),
                )
                .order_by(CampaignContact.contact)
            ]
        else:
            ids = [
                c.id
                for c in Contact.select(Contact.id)
                .where(
                    Contact.wa_status == WaStatus.UNKNOWN,
                    Contact.opted_out_at.is_null(),
                )
                .order_by(Contact.id)
            ]
        with _tasks(cfg) as tasks:
            if ids:
                tasks.enqueue_bulk_verify(ids)
        per_minute = cfg.campaigns.verify_per_minute
        _print(
            args,
            {"queued": len(ids), "verify_per_minute": per_minute},
            f"queued {len(ids)} numbers for verification "
            f"({per_minute:g} per minute; the daemon's verification worker runs them)",
        )
    return EXIT_OK


def events(cfg: Config, args) -> int:
    """`campaignd events list [--dead] [--limit N]` and `events replay ID`."""
    from daemon.domain import events as events_mod

    with _database(cfg):
        if args.action == "list":
            return _events_list(args)
        if args.action == "replay":
            with _tasks(cfg) as tasks:
                event = events_mod.replay(args.id, tasks, cfg)
            _print(
                args,
                events_mod.event_dict(event),
                f"webhook event {event.id} ({event.provider} {event.event_type}) "
                "replayed: queued for processing",
            )
            return EXIT_OK
    raise AssertionError(f"unhandled events action {args.action}")


def _events_list(args) -> int:
    from daemon.domain import events as events_mod

    rows = events_mod.list_events(dead=True if args.dead else None, limit=args.limit)
    if args.json:
        print(json.dumps({"events": rows}, ensure_ascii=False))
        return EXIT_OK
    table = [
        [
            e["id"],
            e["provider"],
            e["event_type"],
            e["received_at"],
            e["state"],
            e["attempts"],
            _shorten(e["last_error"] or "", 60),
        ]
        for e in rows
    ]
    headers = ["ID", "PROVIDER", "TYPE", "RECEIVED", "STATE", "ATTEMPTS", "LAST ERROR"]
    empty = "no dead letters" if args.dead else "no webhook events yet"
    print(_table(headers, table) if rows else empty)
    return EXIT_OK


# --- contacts -----------------------------------------------------------------


def _contacts_import(args) -> int:
    # Streamed: the rows are never all in memory (a million-row file).
    try:
        size = Path(args.file).stat().st_size
    except OSError:
        size = 0  # import_csv_file says why it cannot read it
    big = size >= PROGRESS_MIN_BYTES
    parsed, result = import_csv_file(
        args.file,
        args.region,
        check_progress=_progress_bar("reading") if big else None,
        progress=_progress_bar("importing") if big else None,
    )
    report = _import_report(args.file, parsed, result)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(_import_text(report))
    if parsed.errors:
        print(
            f"campaignd: error: {_plural(len(parsed.errors), 'row')} rejected "
            f"(listed above); the {report['imported']} valid rows were imported",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _import_report(path: str, parsed: ParsedCsv, result: ImportResult) -> dict:
    return {
        "file": str(path),
        "encoding": parsed.encoding,
        # Distinct numbers (the streamed import keeps no rows).
        "imported": result.created + result.updated,
        "created": result.created,
        "updated": result.updated,
        "duplicates_merged": parsed.duplicates_merged,
        "rejected": [{"line": line, "reason": why} for line, why in parsed.errors],
    }


def _import_text(report: dict) -> str:
    lines = [
        f"{report['file']}: {report['imported']} contacts imported "
        f"({report['created']} created, {report['updated']} updated), "
        f"{report['duplicates_merged']} duplicates merged, "
        f"{_plural(len(report['rejected']), 'row')} rejected"
    ]
    if report["encoding"] != "utf-8":
        lines.append(f"note: the file is not UTF-8; read it as {report['encoding']}")
    lines.extend(f"line {r['line']}: {r['reason']}" for r in report["rejected"])
    return "\n".join(lines)


def _parse_with_progress(path: str, region: str) -> ParsedCsv:
    try:
        size = Path(path).stat().st_size
    except OSError:
        size = 0  # parse_csv_file says why it cannot read it
    progress = _progress_bar("reading") if size >= PROGRESS_MIN_BYTES else None
    return parse_csv_file(path, region, progress=progress)


def _contacts_list(args) -> int:
    if args.limit < 1:
        raise InputError(f"--limit: must be at least 1, got {args.limit}")
    total = Contact.select().count()
    rows = [
        _contact_dict(c)
        for c in Contact.select().order_by(Contact.id).limit(args.limit)
    ]
    if args.json:
        print(json.dumps({"total": total, "contacts": rows}, ensure_ascii=False))
        return EXIT_OK
    table = [
        [
            c["id"],
            c["phone"],
            c["name"],
            c["wa_status"],
            "yes" if c["opted_out_at"] else "",
            _shorten(json.dumps(c["variables"], ensure_ascii=False), 40),
        ]
        for c in rows
    ]
    print(_table(["ID", "PHONE", "NAME", "WHATSAPP", "OPTED OUT", "VARIABLES"], table))
    print(f"{len(rows)} of {total} contacts")
    return EXIT_OK


def _contact_dict(contact: Contact) -> dict:
    return {
        "id": contact.id,
        "phone": contact.phone,
        "name": contact.name,
        "variables": contact.variables or {},
        "wa_status": contact.wa_status,
        "wa_checked_at": iso_z(contact.wa_checked_at),
        "opted_out_at": iso_z(contact.opted_out_at),
        "created_at": iso_z(contact.created_at),
    }


def _contacts_opt_out(args) -> int:
    contact = _contact_by_phone(args.phone, args.region)
    already = contact.opted_out_at is not None
    if not already:
        campaigns.opt_out_contact(contact, "opted out by the operator")
    contact = Contact.get_by_id(contact.id)
    text = f"{contact.phone} opted out"
    if already:
        text += f" already (since {iso_z(contact.opted_out_at)})"
    _print(args, _contact_dict(contact), text)
    return EXIT_OK


def _contact_by_phone(raw: str, region: str = "FR") -> Contact:
    phone = normalize_phone(raw, region)
    contact = Contact.get_or_none(Contact.phone == phone)
    if contact is None:
        raise NotFoundError(f"no contact with phone number {phone}")
    return contact


# --- campaigns ----------------------------------------------------------------


def _campaign_create(cfg: Config, args, db) -> int:
    if bool(args.contacts) == bool(args.all_contacts):
        raise InputError("give either --contacts FILE.csv or --all-contacts")
    skip_invalid = cfg.campaigns.skip_invalid_numbers
    imported = None
    if args.contacts:
        parsed = _parse_with_progress(args.contacts, args.region)
        if parsed.errors:
            _print_rejected(args, args.contacts, parsed)
            rejected = _plural(len(parsed.errors), "row")
            raise InputError(
                f"{args.contacts}: {rejected} rejected (listed above); fix them "
                "and run again (nothing was imported or created)"
            )
        if not parsed.rows:
            raise InputError(f"{args.contacts}: no contacts in the file")
        # One transaction: a template error also undoes the contact import.
        with db.atomic():
            imported = import_rows(parsed.rows)
            created = campaigns.create_campaign(
                args.name,
                args.message1,
                args.message2,
                imported.contact_ids,
                skip_invalid=skip_invalid,
            )
    else:
        if not Contact.select().exists():
            raise InputError("no contacts yet: import some first")
        # None: every contact, read in chunks (a million ids as models
        # would not fit the memory budget).
        created = campaigns.create_campaign(
            args.name, args.message1, args.message2, None, skip_invalid=skip_invalid
        )
    summary = campaigns.campaign_summary(created.id)
    if imported is not None:
        summary["imported"] = {
            "created": imported.created,
            "updated": imported.updated,
            "duplicates_merged": parsed.duplicates_merged,
        }
    _print_summary(args, summary)
    if not args.json:
        print(f"start it with: campaignd campaign start {created.id}")
    return EXIT_OK


def _print_rejected(args, path: str, parsed: ParsedCsv) -> None:
    rejected = [{"line": line, "reason": why} for line, why in parsed.errors]
    if args.json:
        print(json.dumps({"file": str(path), "rejected": rejected}, ensure_ascii=False))
    else:
        for row in rejected:
            print(f"line {row['line']}: {row['reason']}")


def _campaign_list(args) -> int:
    rows = campaigns.list_campaigns()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return EXIT_OK
    table = [
        [
            c["id"],
            _shorten(c["name"], 30),
            c["status"],
            c["contacts"],
            c["created_at"] or "",
            c["started_at"] or "",
            c["finished_at"] or "",
        ]
        for c in rows
    ]
    headers = ["ID", "NAME", "STATUS", "CONTACTS", "CREATED", "STARTED", "FINISHED"]
    print(_table(headers, table) if rows else "no campaigns yet")
    return EXIT_OK


def _campaign_enqueueing_action(cfg: Config, args) -> int:
    with _tasks(cfg) as tasks:
        extra = service.campaign_action(args.id, args.action, tasks)
    _print_summary(args, {**campaigns.campaign_summary(args.id), **extra})
    return EXIT_OK


def _print_summary(args, summary: dict) -> None:
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    lines = [f"campaign {summary['id']}: {summary['name']}"]
    status = summary["status"]
    if summary.get("status_reason"):
        status += f" ({summary['status_reason']})"
    lines.append(f"  status      {status}")
    for key in ("created_at", "started_at", "finished_at"):
        if summary.get(key):
            lines.append(f"  {key.removesuffix('_at'):<11} {summary[key]}")
    lines.append(f"  contacts    {summary.get('contacts', 0)}")
    for label in ("members", "messages"):
        if summary.get(label):
            lines.append(f"  {label:<11} {_counts(summary[label])}")
    unsure = summary.get("unconfirmed")
    if unsure and any(unsure.values()):
        lines.append(
            f"  unconfirmed {unsure['waiting']} waiting for evidence, "
            f"{unsure['resent']} re-sent without it, {unsure['failed']} failed"
        )
    if "retried" in summary:
        lines.append(f"  retried     {summary['retried']} failed messages")
    if "imported" in summary:
        done = summary["imported"]
        lines.append(
            f"  imported    {done['created']} new contacts, {done['updated']} "
            f"updated, {done['duplicates_merged']} duplicates merged"
        )
    lines.append(f"  message 1   {_shorten(summary.get('message1', ''), 60)}")
    lines.append(f"  message 2   {_shorten(summary.get('message2', ''), 60)}")
    print("\n".join(lines))


def _counts(counts: dict) -> str:
    """'pending 3, sent 2' from {"pending": 3, ...}; nested dicts as 'a: (...)'."""
    parts = []
    for key, value in counts.items():
        if isinstance(value, dict):
            if value:
                parts.append(f"{key} ({_counts(value)})")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "none"


# --- verification -------------------------------------------------------------


def _verify_phone(cfg: Config, args) -> int:
    from daemon.providers import make_provider

    phone = normalize_phone(args.phone, args.region)
    provider = make_provider(cfg.provider)
    try:
        check = provider.check_number(phone)
    finally:
        provider.close()
    status = WaStatus.VALID if check.exists else WaStatus.INVALID
    stored = (
        Contact.update(wa_status=status, wa_checked_at=utcnow())
        .where(Contact.phone == phone)
        .execute()
    )
    verdict = "is on WhatsApp" if check.exists else "is NOT on WhatsApp"
    _print(
        args,
        {"phone": phone, "exists": check.exists, "stored": bool(stored)},
        f"{phone} {verdict}"
        + ("" if stored else " (not a known contact: nothing stored)"),
    )
    return EXIT_OK


# --- plumbing -------------------------------------------------------------------


@contextlib.contextmanager
def _database(cfg: Config) -> Iterator:
    db = open_database(cfg, migrate_schema=True)
    try:
        with db.connection_context():
            yield db
    finally:
        close_all = getattr(db, "close_all", None)
        if close_all:
            close_all()


@contextlib.contextmanager
def _tasks(cfg: Config) -> Iterator:
    from daemon.app.tasks import Tasks
    from daemon.store.queue import make_queues

    queues = make_queues(cfg)
    try:
        yield Tasks(cfg, queues)
    finally:
        queues.close()


def _print(args, data: dict, text: str) -> None:
    print(json.dumps(data, ensure_ascii=False) if args.json else text)


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], int) for row in rows) for i in range(len(headers))
    ]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _progress_bar(label: str) -> _ProgressBar | None:
    """A progress(done, total) callback drawing on stderr, or None if no TTY."""
    return _ProgressBar(label) if sys.stderr.isatty() else None


class _ProgressBar:
    """`reading   [#########---------------------]  30%`, redrawn in place."""

    WIDTH = 30

    def __init__(self, label: str) -> None:
        self._label = label
        self._shown = -1
        self._drawn_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        now = time.monotonic()
        # A redraw per percent at most 10 times a second: a terminal on a
        # slow SSH link must not become the bottleneck.
        if percent == self._shown or (percent < 100 and now - self._drawn_at < 0.1):
            return
        self._shown, self._drawn_at = percent, now
        filled = percent * self.WIDTH // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        end = "\n" if percent >= 100 else ""
        print(f"\r{self._label:<9} [{bar}] {percent:3d}%", end=end, file=sys.stderr)
        sys.stderr.flush()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
