"""Operator commands on the database itself: contacts, campaigns, verification.

They work with the daemon up or down: each opens the database (applying any
pending migration), does its work in short transactions, and enqueues what
the workers must do on the configured queues, where a stopped daemon finds
it when it starts. Every command prints a readable report, or JSON with
``--json``; errors are raised (InputError, NotFoundError, StateError) and
cli.py prints them as one line with exit code 1.

``contacts import`` and ``campaign create --contacts`` follow one rule, the
application service's (daemon/app/service.py, which the admin API calls
too): the valid rows of the file are imported in one transaction and every
rejected row is listed with its line number and reason; any rejected row
makes the exit code 1 (the valid rows stay imported, the campaign stays
created). ``--strict`` refuses the whole file when a row is bad: nothing is
imported or created. A fatal error (an unreadable file, no phone column,
malformed CSV), a file with no valid row, or a template variable that a
column or a contact lacks imports nothing and creates nothing.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from daemon import campaign_report
from daemon import watch
from daemon.app import service
from daemon.campaign_report import plural
from daemon.campaign_report import shorten
from daemon.config import Config
from daemon.domain import campaigns
from daemon.domain.contacts import normalize_phone
from daemon.domain.contacts import verification
from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.store import db as db_schema
from daemon.store.db import close_database
from daemon.store.db import open_database
from daemon.store.models import Contact
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
    with _database(cfg):
        if args.action == "create":
            return _campaign_create(cfg, args)
        if args.action == "list":
            return _campaign_list(args)
        if args.action == "show":
            if getattr(args, "watch", False):
                if args.json:
                    raise InputError("--watch draws text: leave out --json")
                return watch.watch(cfg, args.id, args.interval)
            summary = campaign_report.with_sending(
                cfg, campaigns.campaign_summary(args.id)
            )
            campaign_report.print_summary(args, summary)
            return EXIT_OK
        if args.action in ("pause", "cancel"):
            service.campaign_action(
                args.id, args.action, None, reason="paused by the operator"
            )
            campaign_report.print_summary(args, campaigns.campaign_summary(args.id))
            return EXIT_OK
        if args.action in ("start", "resume", "retry-failed"):
            return _campaign_enqueueing_action(cfg, args)
    raise AssertionError(f"unhandled campaign action {args.action}")


def verify(cfg: Config, args) -> int:
    """`campaignd verify --phone P | --campaign ID | --all`."""
    with _database(cfg):
        if args.phone:
            return _verify_phone(cfg, args)
        # The same function as the admin API's verify routes.
        with _tasks(cfg) as tasks:
            if args.campaign is not None:
                result = service.request_verification(tasks, campaign_id=args.campaign)
            else:
                result = service.request_verification(tasks, all_unknown=True)
        per_minute = result["verify_per_minute"]
        text = (
            f"queued {plural(result['queued'], 'number')} for verification "
            f"({per_minute:g} per minute; the daemon's verification worker runs them)"
        )
        if result["already_pending"] or result["opted_out"]:
            text += (
                f"; {result['already_pending']} already pending, "
                f"{result['opted_out']} opted out (not checked)"
            )
        scope = "members" if args.campaign is not None else "contacts"
        figures = campaign_report.verification_text(result["verification"], utcnow())
        _print(args, result, f"{text}\n{scope}: {figures}")
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
            shorten(e["last_error"] or "", 60),
        ]
        for e in rows
    ]
    headers = ["ID", "PROVIDER", "TYPE", "RECEIVED", "STATE", "ATTEMPTS", "LAST ERROR"]
    empty = "no dead letters" if args.dead else "no webhook events yet"
    print(_table(headers, table) if rows else empty)
    return EXIT_OK


def messages(cfg: Config, args) -> int:
    """`campaignd messages list [--campaign N] [--status S] [--kind K]`."""
    if args.limit < 1:
        raise InputError(f"--limit: must be at least 1, got {args.limit}")
    with _database(cfg):
        if args.campaign is not None:
            campaigns.get_campaign(args.campaign)  # NotFoundError, one line
        rows = [
            campaigns.message_dict(m)
            for m in campaigns.list_messages(
                campaign_id=args.campaign,
                status=args.status,
                kind=args.kind,
                limit=args.limit,
            )
        ]
    if args.json:
        print(json.dumps({"messages": rows}, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no messages match")
        return EXIT_OK
    table = [
        [
            m["id"],
            m["campaign_id"],
            m["phone"],
            m["kind"],
            m["status"],
            m["attempts"],
            m["next_attempt_at"] or "",
            shorten(m["error"] or "", 50),
        ]
        for m in rows
    ]
    headers = ["ID", "CAMPAIGN", "PHONE", "KIND", "STATUS", "ATTEMPTS", "NEXT", "ERROR"]
    print(_table(headers, table))
    if len(rows) == args.limit:
        print(f"first {args.limit} shown (--limit to see more)")
    return EXIT_OK


# --- contacts -----------------------------------------------------------------


def _contacts_import(args) -> int:
    # Streamed: the rows are never all in memory (a million-row file).
    try:
        report = service.import_contacts(
            service.CsvFile(args.file),
            args.region,
            strict=args.strict,
            **_progress_bars(args.file),
        )
    except service.RejectedRows as exc:
        return _refused(args, exc, "imported")
    if args.json:
        print(json.dumps(_import_json(report), ensure_ascii=False))
    else:
        print(_import_text(report))
    if report.errors:
        valid = plural(report.imported, "valid contact")
        print(
            f"campaignd: error: {plural(len(report.errors), 'row')} rejected "
            f"(listed above); {valid} imported",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _progress_bars(path: str) -> dict:
    """Progress bars for a file big enough to wait for (on a terminal)."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        size = 0  # the import says why it cannot read it
    if size < PROGRESS_MIN_BYTES:
        return {}
    return {
        "check_progress": _progress_bar("reading"),
        "progress": _progress_bar("importing"),
    }


def _refused(args, exc: service.RejectedRows, done: str) -> int:
    """A refused file: every rejected row, then one error line."""
    if args.json:
        rejected = {"file": exc.source, "rejected": exc.rejected_json()}
        print(json.dumps(rejected, ensure_ascii=False))
    else:
        for line, reason in exc.errors:
            print(f"line {line}: {reason}")
    rows = plural(len(exc.errors), "row")
    why = "strict: one bad row refuses the file" if exc.strict else "no valid row"
    print(
        f"campaignd: error: {exc.source}: {rows} rejected (listed above); "
        f"{why}, nothing was {done}",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _import_json(report: service.ImportReport) -> dict:
    return {
        "file": report.source,
        "encoding": report.encoding,
        # Distinct numbers (the streamed import keeps no rows).
        "imported": report.imported,
        "created": report.created,
        "updated": report.updated,
        "duplicates_merged": report.duplicates_merged,
        "rejected": report.rejected_json(),
    }


def _import_text(report: service.ImportReport) -> str:
    lines = [
        f"{report.source}: {plural(report.imported, 'contact')} imported "
        f"({report.created} created, {report.updated} updated), "
        f"{plural(report.duplicates_merged, 'duplicate')} merged, "
        f"{plural(len(report.errors), 'row')} rejected"
    ]
    if report.encoding != "utf-8":
        lines.append(f"note: the file is not UTF-8; read it as {report.encoding}")
    lines.extend(f"line {line}: {reason}" for line, reason in report.errors)
    return "\n".join(lines)


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
            shorten(json.dumps(c["variables"], ensure_ascii=False), 40),
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


def _campaign_create(cfg: Config, args) -> int:
    if bool(args.contacts) == bool(args.all_contacts):
        raise InputError("give either --contacts FILE.csv or --all-contacts")
    if args.strict and not args.contacts:
        raise InputError("--strict applies to --contacts FILE.csv")
    source = service.CsvFile(args.contacts) if args.contacts else None
    try:
        created, report = service.create_campaign_from(
            args.name,
            args.message1,
            args.message2,
            source=source,
            all_contacts=args.all_contacts,
            region=args.region,
            skip_invalid=cfg.campaigns.skip_invalid_numbers,
            strict=args.strict,
            **(_progress_bars(args.contacts) if args.contacts else {}),
        )
    except service.RejectedRows as exc:
        return _refused(args, exc, "imported or created")
    summary = campaigns.campaign_summary(created.id)
    if report is not None:
        summary["imported"] = {
            "created": report.created,
            "updated": report.updated,
            "duplicates_merged": report.duplicates_merged,
            "rejected": report.rejected_json(),
        }
    campaign_report.print_summary(args, summary)
    if not args.json:
        if report is not None:
            for line, reason in report.errors:
                print(f"line {line}: {reason}")
        print(f"start it with: campaignd campaign start {created.id}")
    if report is not None and report.errors:
        print(
            f"campaignd: error: {plural(len(report.errors), 'row')} rejected "
            f"(listed above); campaign {created.id} was created with the "
            f"{plural(report.imported, 'valid contact')}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _campaign_list(args) -> int:
    rows = campaigns.list_campaigns()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return EXIT_OK
    table = [
        [
            c["id"],
            shorten(c["name"], 30),
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
    campaign_report.print_summary(
        args, {**campaigns.campaign_summary(args.id), **extra}
    )
    return EXIT_OK


# --- verification -------------------------------------------------------------


def _verify_phone(cfg: Config, args) -> int:
    from daemon.providers import make_provider

    phone = normalize_phone(args.phone, args.region)
    provider = make_provider(cfg.provider)
    try:
        check = provider.check_number(phone)
    finally:
        provider.close()
    # A known contact's check row says so too (any pending check is done).
    known = Contact.get_or_none(Contact.phone == phone)
    if known is not None:
        verification.record_now(known.id, check.exists, utcnow())
    stored = known is not None
    verdict = "is on WhatsApp" if check.exists else "is NOT on WhatsApp"
    _print(
        args,
        {"phone": phone, "exists": check.exists, "stored": bool(stored)},
        f"{phone} {verdict}"
        + ("" if stored else " (not a known contact: nothing stored)"),
    )
    return EXIT_OK


def migrate(cfg: Config, args) -> int:
    """`campaignd migrate`: apply the pending schema migrations now."""
    db = open_database(cfg)
    try:
        applied = db_schema.migrate(db)
    finally:
        close_database(db)
    if applied:
        print(f"applied {plural(len(applied), 'migration')}: {', '.join(applied)}")
    else:
        print("the database schema is up to date")
    return EXIT_OK


# --- plumbing -------------------------------------------------------------------


@contextlib.contextmanager
def _database(cfg: Config) -> Iterator:
    url = cfg.database_url
    new_file = (
        cfg.data_dir_relative
        and url.startswith("sqlite:///")
        and not Path(url.removeprefix("sqlite:///")).exists()
    )
    db = open_database(cfg)
    try:
        _schema_ready(db)
        if new_file:
            # A relative data_dir run from another directory must not look
            # like lost data: say that this database was just created, and
            # where.
            where = url.removeprefix("sqlite:///")
            print(
                f"campaignd: created a new database at {where} (daemon.data_dir "
                "is relative to the current directory)",
                file=sys.stderr,
            )
        with db.connection_context():
            yield db
    finally:
        close_database(db)


def _schema_ready(db) -> None:
    """Create a new database's schema; refuse an older one.

    A command run from a newer install must not migrate the schema under a
    daemon still running the older code (which would then fail on it): the
    daemon applies migrations when it starts, and `campaignd migrate` does
    it on purpose. A database with no schema yet has nothing running on it.
    """
    pending = db_schema.pending_migrations(db)
    if pending is None:
        db_schema.migrate(db)
    elif pending:
        raise StateError(
            f"the database schema is older than this campaignd "
            f"({plural(len(pending), 'migration')} to apply: {', '.join(pending)}):"
            " restart the daemon (it applies them when it starts) or run"
            " `campaignd migrate`"
        )


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
