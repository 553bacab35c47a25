"""The domain: campaigns, the send state machine, replies and Message 2.

Every function here works on the database alone (no queue, no HTTP), so the
same rules hold wherever they are called from: a worker thread, the web role,
the CLI or a test. Guarantees are carried by single SQL statements and unique
constraints, never by check-then-act:

- a claim is one ``UPDATE ... WHERE status ... RETURNING``: a second claim of
  the same row finds nothing, so a task enqueued twice sends once;
- Message 1 and Message 2 are unique per (campaign, contact, kind);
- statuses only move forward (``UPDATE ... WHERE status IN (lower ranks)``).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import string
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import peewee as pw

from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.store.db import is_postgres
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import InboundEvent
from daemon.store.models import Interaction
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

PRIORITY_MESSAGE_2 = 10
# A row claimed this many times without an answer from the provider keeps
# killing its worker (or the workers keep dying): give up on it.
MAX_INTERRUPTED_ATTEMPTS = 20
# WhatsApp's customer service window: free-form messages (Message 2) only
# within 24 h of the contact's last message (providers.md).
SESSION_WINDOW = dt.timedelta(hours=24)
_CHUNK = 500
_BUILTIN_FIELDS = ("name", "phone")
_SENT_OR_LATER = ("sent", "delivered", "read")
# A message not settled yet: its campaign cannot complete.
_OPEN_MESSAGE_STATUSES = ("queued", "sending", "unconfirmed")
# Message 1 was attempted at least once: a reply from its contact proves it
# arrived (queued rows count only with attempts > 0: a retry is pending).
_ATTEMPTED = ("sending", "unconfirmed") + _SENT_OR_LATER
# A reply can answer a member in these states. EXPIRED is included because
# the window is judged at the reply's arrival: the expiry job may have run
# between its arrival and its processing.
_REPLYABLE_STATES = ("pending", "message_1_sent", "expired")


# ---------------------------------------------------------------- templates


def template_fields(template: str) -> set[str]:
    """The `{variable}` names a template uses; InputError if it is malformed."""
    fields = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"invalid template {template[:40]!r}: {exc}") from None
    for _, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if not field_name.isidentifier():
            raise InputError(
                f"invalid template variable {{{field_name}}}: use {{name}}-style "
                "names (letters, digits, underscore)"
            )
        if format_spec or conversion:
            raise InputError(f"template variable {{{field_name}}}: no format specs")
        fields.add(field_name)
    return fields


def template_values(contact) -> dict[str, str]:
    """{variable: text} of a Contact (or anything with phone, name, variables)."""
    values = {k: str(v) for k, v in (contact.variables or {}).items()}
    values["name"] = contact.name
    values["phone"] = contact.phone
    return values


def render(template: str, contact: Contact) -> str:
    return template.format_map(template_values(contact))


def _check_contact_has(fields: set[str], contact) -> None:
    values = template_values(contact)
    for name in sorted(fields):
        if not values.get(name):
            raise InputError(
                f"template variable {{{name}}} is missing for contact {contact.phone}"
            )


# ---------------------------------------------------------------- lifecycle


def create_campaign(
    name: str,
    message1: str,
    message2: str,
    contact_ids: Iterable[int] | None,
    *,
    skip_invalid: bool = True,
) -> Campaign:
    """Create a draft campaign; every contact must fill every template variable.

    `contact_ids` None means every contact. Bounded memory at a million
    contacts: the contacts are read as tuples, `_MEMBER_CHUNK` at a time in id
    order, and each chunk's members written by one INSERT ... SELECT.
    """
    name = (name or "").strip()
    if not name:
        raise InputError("campaign name is empty")
    for label, text in (("message1", message1), ("message2", message2)):
        if not text or not text.strip():
            raise InputError(f"{label} is empty")
        if len(text) > 4096:
            raise InputError(f"{label} is longer than 4096 characters")
    fields = template_fields(message1) | template_fields(message2)
    ids = None if contact_ids is None else sorted(set(contact_ids))
    with database.atomic():
        campaign = Campaign.create(
            name=name, message1=message1, message2=message2, skip_invalid=skip_invalid
        )
        now = utcnow()
        total = 0
        # A contact that does not exist wins over a missing variable (the
        # lowest such id), as when every contact was loaded first.
        template_error: InputError | None = None
        for chunk in _contact_chunks(ids):
            if template_error is None:
                template_error = _check_chunk(fields, chunk)
            if template_error is not None:
                # Only existence is left to check: no rows to write.
                _check_exist(chunk)
                continue
            total += _insert_members(campaign.id, chunk, now)
        if template_error is not None:
            raise template_error
        Campaign.update(members_total=total).where(Campaign.id == campaign.id).execute()
        campaign.members_total = total
    return campaign


# Contacts per query and INSERT ... SELECT in create_campaign.
_MEMBER_CHUNK = 5000


def _contact_chunks(ids: list[int] | None):
    """(first id, last id, ids or None for "every contact in that range")."""
    if ids is not None:
        for start in range(0, len(ids), _MEMBER_CHUNK):
            chunk = ids[start : start + _MEMBER_CHUNK]
            yield chunk[0], chunk[-1], chunk
        return
    after = 0
    while True:
        rows = database.execute_sql(
            f"SELECT id FROM contact WHERE id > {database.param} ORDER BY id "
            f"LIMIT {_MEMBER_CHUNK}",
            (after,),
        ).fetchall()
        if not rows:
            return
        yield rows[0][0], rows[-1][0], None
        after = rows[-1][0]


def _chunk_where(chunk) -> tuple[str, list]:
    first, last, ids = chunk
    p = database.param
    if ids is None:
        return f"id >= {p} AND id <= {p}", [first, last]
    return f"id IN ({', '.join([p] * len(ids))})", list(ids)


def _check_exist(chunk) -> None:
    first, last, ids = chunk
    if ids is None:
        return
    where, params = _chunk_where(chunk)
    found = {
        row[0]
        for row in database.execute_sql(
            f"SELECT id FROM contact WHERE {where}", params
        ).fetchall()
    }
    if len(found) != len(ids):
        missing = min(set(ids) - found)
        raise NotFoundError(f"contact {missing} does not exist")


def _check_chunk(fields: set[str], chunk) -> InputError | None:
    """The chunk's contacts exist (NotFoundError) and fill every variable.

    Returns the first missing variable, in contact id order, as an error to
    raise once every later chunk is known to exist. An opted-out contact gets
    nothing, so its variables do not matter.
    """
    _check_exist(chunk)
    if not fields:
        return None
    where, params = _chunk_where(chunk)
    rows = database.execute_sql(
        f"SELECT id, phone, name, variables FROM contact WHERE {where} "
        "AND opted_out_at IS NULL ORDER BY id",
        params,
    )
    parse = Contact.variables.python_value
    for _, phone, contact_name, variables in rows:
        contact = _Recipient(phone, contact_name, parse(variables))
        try:
            _check_contact_has(fields, contact)
        except InputError as exc:
            return exc
    return None


def _insert_members(campaign_id: int, chunk, now) -> int:
    """The chunk's contacts as members; how many rows were written."""
    where, params = _chunk_where(chunk)
    p = database.param
    cursor = database.execute_sql(
        "INSERT INTO campaign_contact (campaign_id, contact_id, state, updated_at) "
        f"SELECT {p}, id, CASE WHEN opted_out_at IS NULL THEN {p} ELSE {p} END, {p} "
        # Opted-out contacts stay out of every later campaign.
        f"FROM contact WHERE {where} ORDER BY id",
        [campaign_id, MemberState.PENDING, MemberState.OPTED_OUT, now, *params],
    )
    return cursor.rowcount


def get_campaign(campaign_id: int) -> Campaign:
    campaign = Campaign.get_or_none(Campaign.id == campaign_id)
    if campaign is None:
        raise NotFoundError(f"campaign {campaign_id} does not exist")
    return campaign


def _set_status(campaign_id: int, allowed: tuple[str, ...], new: str, **extra) -> int:
    return (
        Campaign.update(status=new, **extra)
        .where(Campaign.id == campaign_id, Campaign.status.in_(allowed))
        .execute()
    )


def _transition(campaign_id, allowed, new, verb, **extra) -> Campaign:
    campaign = get_campaign(campaign_id)
    if not _set_status(campaign_id, allowed, new, **extra):
        campaign = get_campaign(campaign_id)
        raise StateError(
            f"cannot {verb} campaign {campaign_id}: it is {campaign.status}"
        )
    return get_campaign(campaign_id)


def start_campaign(campaign_id: int, tasks) -> Campaign:
    """draft -> running, then fan out Message 1 in the background."""
    campaign = _transition(
        campaign_id,
        (CampaignStatus.DRAFT,),
        CampaignStatus.RUNNING,
        "start",
        started_at=utcnow(),
        # A draft has no messages; the fan-out adds each batch's count.
        message1_total=0,
    )
    tasks.enqueue_fanout(campaign_id)
    return campaign


def pause_campaign(campaign_id: int, reason: str = "") -> Campaign:
    """running -> paused: no new sends; sends already in flight finish."""
    return _transition(
        campaign_id,
        (CampaignStatus.RUNNING,),
        CampaignStatus.PAUSED,
        "pause",
        status_reason=reason,
    )


def resume_campaign(campaign_id: int, tasks) -> Campaign:
    campaign = _transition(
        campaign_id,
        (CampaignStatus.PAUSED,),
        CampaignStatus.RUNNING,
        "resume",
        status_reason="",
    )
    tasks.enqueue_fanout(campaign_id)
    tasks.enqueue_sends(due_message_ids(campaign_id))
    return campaign


def cancel_campaign(campaign_id: int) -> Campaign:
    """Any open state -> cancelled; messages not yet sent are cancelled."""
    with database.atomic():
        campaign = _transition(
            campaign_id,
            (CampaignStatus.DRAFT, CampaignStatus.RUNNING, CampaignStatus.PAUSED),
            CampaignStatus.CANCELLED,
            "cancel",
            finished_at=utcnow(),
        )
        Message.update(status=MessageStatus.CANCELLED).where(
            Message.campaign == campaign_id,
            Message.status.in_((MessageStatus.QUEUED, MessageStatus.PENDING)),
        ).execute()
    return campaign


def retry_failed(campaign_id: int, tasks) -> int:
    """Queue every failed message of a campaign again, from attempt zero.

    Messages to contacts who opted out since are left failed: an opt-out is
    final, whatever the operator retries.
    """
    get_campaign(campaign_id)
    with database.atomic():
        failed = list(
            Message.select(Message.id, Message.kind, Message.contact).where(
                Message.campaign == campaign_id,
                Message.status == MessageStatus.FAILED,
                ~contact_opted_out(),
            )
        )
        if not failed:
            return 0
        ids = [m.id for m in failed]
        for start in range(0, len(ids), _CHUNK):
            Message.update(
                status=MessageStatus.QUEUED,
                attempts=0,
                failures=0,
                next_attempt_at=None,
                error=None,
                failed_at=None,
                enqueued_at=utcnow(),
            ).where(Message.id.in_(ids[start : start + _CHUNK])).execute()
        for kind, back_to in ((1, MemberState.PENDING), (2, MemberState.INTERACTED)):
            contacts = [m.contact_id for m in failed if m.kind == kind]
            for start in range(0, len(contacts), _CHUNK):
                CampaignContact.update(state=back_to, updated_at=utcnow()).where(
                    CampaignContact.campaign == campaign_id,
                    CampaignContact.contact.in_(contacts[start : start + _CHUNK]),
                    CampaignContact.state == MemberState.FAILED,
                ).execute()
        _set_status(
            campaign_id,
            (CampaignStatus.COMPLETED,),
            CampaignStatus.RUNNING,
            finished_at=None,
        )
    tasks.enqueue_sends(ids)
    return len(ids)


def maybe_complete(campaign_id: int) -> bool:
    """running -> completed once every contact reached a final state."""
    open_members = CampaignContact.select(CampaignContact.id).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.state.in_(tuple(MemberState.OPEN)),
    )
    open_messages = Message.select(Message.id).where(
        Message.campaign == campaign_id,
        Message.status.in_(_OPEN_MESSAGE_STATUSES),
    )
    if open_members.exists() or open_messages.exists():
        return False
    return bool(
        _set_status(
            campaign_id,
            (CampaignStatus.RUNNING,),
            CampaignStatus.COMPLETED,
            finished_at=utcnow(),
        )
    )


# ---------------------------------------------------------------- views

_COUNT_ALL = pw.fn.COUNT(pw.SQL("*"))


def campaign_summary(campaign_id: int) -> dict:
    campaign = get_campaign(campaign_id)
    # One COUNT(*) per state (and per kind and status), each a range of the
    # (campaign, state, id) or (campaign, kind, status) index (m0003): half
    # the time of a GROUP BY over the same entries, which decodes every one
    # (~0.1 s instead of ~0.35 s at a million members on SQLite).
    # The biggest count right after a fan-out (a million pending members, a
    # million queued Message 1) is the campaign's total minus the others
    # (m0007): counting it read every entry, and on PostgreSQL visited every
    # row too until VACUUM marks the pages all-visible (0.7 s at a million).
    members = _counts(
        "campaign_contact",
        ("state",),
        [(s,) for s in _values(MemberState)],
        campaign_id,
        derive=((MemberState.PENDING,), "members_total"),
    )
    keys = [(k, s) for k in (1, 2) for s in _values(MessageStatus)]
    messages: dict[str, dict[str, int]] = {"message1": {}, "message2": {}}
    for (kind, status), count in _counts(
        "message",
        ("kind", "status"),
        keys,
        campaign_id,
        derive=((1, MessageStatus.QUEUED), "message1_total"),
    ).items():
        messages[f"message{kind}"][status] = count
    return {
        **_campaign_fields(campaign),
        "contacts": sum(members.values()),
        "members": members,
        "messages": messages,
        "unconfirmed": _unconfirmed_summary(campaign_id, messages),
    }


def _unconfirmed_summary(campaign_id: int, messages: dict) -> dict:
    """Sends whose outcome was unknown: waiting for evidence now, re-sent for
    want of it (each may be a second message on a phone), failed by policy."""
    waiting = sum(m.get(MessageStatus.UNCONFIRMED, 0) for m in messages.values())
    # Two index ranges instead of one OR, which read every row of the
    # campaign (1.1 s at a million): re-sent rows through the partial index
    # on resends > 0 (m0005), failed rows through (campaign, status).
    ours = Message.campaign == campaign_id
    by_policy = Message.error.startswith("unconfirmed:")
    failed_row = (Message.status == MessageStatus.FAILED) & Message.error.is_null(False)
    resent, resent_by_policy = (
        Message.select(
            pw.fn.COALESCE(pw.fn.SUM(Message.resends), 0),
            pw.fn.COUNT(Message.id).filter(by_policy & ~failed_row),
        )
        .where(ours, Message.resends > 0)
        .tuples()
        .first()
    ) or (0, 0)
    failed = (
        Message.select(Message.id)
        .where(ours, Message.status == MessageStatus.FAILED, by_policy)
        .count()
    )
    return {
        "waiting": waiting,
        "resent": int(resent or 0),
        "failed": int(failed) + int(resent_by_policy or 0),
    }


def _values(states: type) -> list[str]:
    """The state names a MemberState / MessageStatus-like class defines."""
    return sorted(
        value
        for name, value in vars(states).items()
        if name.isupper() and isinstance(value, str)
    )


def _counts(
    table: str,
    columns: tuple[str, ...],
    keys: list[tuple],
    campaign_id,
    derive: tuple[tuple, str] | None = None,
):
    """{key: count} of a campaign's rows per value of `columns`, zeros left out.

    `derive` (key, total column of campaign): when that total is known, the
    key's count is the total minus the counts of the keys that share all its
    columns but the last, all read by one statement (one snapshot); when it is NULL
    the key is counted like the others.
    """
    p = database.param
    where = " AND ".join(f"{column} = {p}" for column in columns)
    one = f"SELECT COUNT(*) FROM {table} WHERE campaign_id = {p} AND {where}"
    parts, params = [], []
    total_sql = ""
    if derive is not None:
        total_sql = f"(SELECT {derive[1]} FROM campaign WHERE id = {p})"
        parts.append(f"SELECT -1, {total_sql}")
        params.append(campaign_id)
    for i, key in enumerate(keys):
        if derive is not None and key == derive[0]:
            # CASE evaluates the count only when the total is not known.
            parts.append(f"SELECT {i}, CASE WHEN {total_sql} IS NULL THEN ({one}) END")
            params += [campaign_id, campaign_id, *key]
        else:
            parts.append(f"SELECT {i}, ({one})")
            params += [campaign_id, *key]
    rows = database.execute_sql(" UNION ALL ".join(parts), params).fetchall()
    counts = {keys[i]: count for i, count in rows if i >= 0 and count is not None}
    total = next((count for i, count in rows if i == -1), None)
    if derive is not None and total is not None:
        key = derive[0]
        others = sum(n for k, n in counts.items() if k[:-1] == key[:-1] and k != key)
        counts[key] = total - others
        if counts[key] < 0:  # cannot happen while the total is kept right
            log.warning("campaign %s: %s is behind; counting", campaign_id, derive[1])
            counts[key] = database.execute_sql(one, [campaign_id, *key]).fetchone()[0]
    single = len(columns) == 1
    return {key[0] if single else key: n for key, n in counts.items() if n}


def _campaign_fields(campaign: Campaign) -> dict:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "status": campaign.status,
        "status_reason": campaign.status_reason,
        "message1": campaign.message1,
        "message2": campaign.message2,
        "created_at": _iso(campaign.created_at),
        "started_at": _iso(campaign.started_at),
        "finished_at": _iso(campaign.finished_at),
    }


def list_campaigns() -> list[dict]:
    counts = dict(
        CampaignContact.select(CampaignContact.campaign, _COUNT_ALL)
        .group_by(CampaignContact.campaign)
        .tuples()
    )
    return [
        {**_campaign_fields(c), "contacts": counts.get(c.id, 0)}
        for c in Campaign.select().order_by(Campaign.id)
    ]


def message_dict(message: Message) -> dict:
    return {
        "id": message.id,
        "campaign_id": message.campaign_id,
        "contact_id": message.contact_id,
        "phone": message.phone,
        "kind": message.kind,
        "status": message.status,
        "attempts": message.attempts,
        "error": message.error,
        "idempotency_key": message.idempotency_key,
        "provider_id": message.provider_id,
        "created_at": _iso(message.created_at),
        "sent_at": _iso(message.sent_at),
        "delivered_at": _iso(message.delivered_at),
        "read_at": _iso(message.read_at),
        "failed_at": _iso(message.failed_at),
        "next_attempt_at": _iso(message.next_attempt_at),
    }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


# ---------------------------------------------------------------- fan-out


def idempotency_key(campaign_id: int, contact_id: int, kind: int) -> str:
    return f"cd-{campaign_id}-{contact_id}-m{kind}"


def fan_out(
    campaign_id: int, batch_size: int = 500, analyze: bool = False
) -> list[int]:
    """Create the next batch of Message 1 rows; their ids (to enqueue) or []."""
    return fan_out_batch(campaign_id, batch_size, analyze=analyze)[0]


def fan_out_batch(
    campaign_id: int,
    batch_size: int = 500,
    after_member_id: int = 0,
    *,
    analyze: bool = False,
    until_member_id: int | None = None,
) -> tuple[list[int], int | None]:
    """One batch of Message 1 rows: (new message ids, last member id seen).

    `until_member_id`: only members up to that id (one of several chains,
    see fanout_ranges).

    The last member id is None once no member is left past `after_member_id`
    (a batch shorter than `batch_size` was the last one); passing it back as
    `after_member_id` keeps every batch from re-reading the members already
    done (members stay pending until their send). Resumable: it only looks at
    members still pending with no Message 1, and the unique (campaign,
    contact, kind) index makes a concurrent or repeated run harmless.

    Written as raw SQL over tuples: peewee's model rows and insert_many SQL
    text cost more than the database work at a million members.
    """
    with database.atomic():
        campaign = Campaign.get_or_none(Campaign.id == campaign_id)
        if campaign is None or campaign.status != CampaignStatus.RUNNING:
            return [], None
        if analyze and is_postgres():
            # Right after a big import the planner believes these tables are
            # empty; fresh statistics keep it on the (campaign, state, id)
            # index instead of scanning every member.
            database.execute_sql("ANALYZE campaign_contact, message")
        until = _NO_BOUND if until_member_id is None else until_member_id
        if is_postgres():
            return _fan_out_batch_pg(campaign, batch_size, after_member_id, until)
        members = database.execute_sql(
            _PENDING_MEMBERS_SQL.format(
                p=database.param,
                # PostgreSQL would turn NOT EXISTS into an anti-join planned
                # from the statistics of a message table that was empty at the
                # last ANALYZE: a nested loop over every Message 1 for every
                # member (seconds per batch at 20k rows, hours at 1M). OFFSET
                # keeps it a per-member probe of an index.
                fence=" OFFSET 0" if is_postgres() else "",
            ),
            (
                campaign_id,
                MemberState.PENDING,
                after_member_id,
                until,
                # idempotency_key(campaign, contact, 1) is this, the contact
                # id, then "-m1".
                f"cd-{campaign_id}-",
                batch_size,
            ),
        ).fetchall()
        if not members:
            return [], None
        now = utcnow()
        parse = Contact.variables.python_value
        rows, opted_out, skipped = [], [], []
        for member_id, contact_id, phone, name, variables, opted_out_at, wa in members:
            if opted_out_at:
                opted_out.append(member_id)
            elif campaign.skip_invalid and wa == WaStatus.INVALID:
                skipped.append(member_id)
            else:
                contact = _Recipient(phone, name, parse(variables))
                rows.append(
                    (
                        contact_id,
                        phone,
                        render(campaign.message1, contact),
                        idempotency_key(campaign.id, contact_id, 1),
                    )
                )
        _set_member_states(opted_out, MemberState.OPTED_OUT, now)
        _set_member_states(skipped, MemberState.SKIPPED, now)
        constants = _message1_constants(campaign.id, now)
        ids = []
        for start in range(0, len(rows), _CHUNK):
            ids += _insert_message_tuples(rows[start : start + _CHUNK], constants)
        _add_message1_total(campaign_id, len(ids))
    last = members[-1][0]
    return ids, (last if len(members) >= batch_size else None)


# Above any member id: "no upper bound" in the member queries.
_NO_BOUND = 2**62
# Members per chain below which a fan-out is not split (fanout_ranges).
_MIN_CHAIN_BATCHES = 20


def fanout_ranges(
    campaign_id: int, chains: int, batch_size: int
) -> list[tuple[int, int | None]]:
    """(after, until) member id ranges for `chains` fan-out chains at once.

    One chain is a sequence of links, each waiting for a free worker thread
    then for its batch: on a busy machine that latency, not the database,
    bounds a chain (~0.1 s a link of 500 with sends running). Several chains
    over disjoint ranges of the pending members divide it. The ranges split
    the pending members' id span evenly (member ids are dense: one INSERT
    ... SELECT per campaign); one range when the campaign is small.
    """
    p = database.param
    low, high = database.execute_sql(
        f"SELECT MIN(id), MAX(id) FROM campaign_contact "
        f"WHERE campaign_id = {p} AND state = {p}",
        (campaign_id, MemberState.PENDING),
    ).fetchone()
    if low is None or chains <= 1:
        return [(0, None)]
    span = high - low + 1
    chains = min(chains, span // (batch_size * _MIN_CHAIN_BATCHES))
    if chains <= 1:
        return [(0, None)]
    step = -(-span // chains)
    bounds = [low - 1 + step * k for k in range(1, chains)]
    return list(zip([0, *bounds], [*bounds, None], strict=True))


def _fan_out_batch_pg(
    campaign: Campaign, batch_size: int, after: int, until: int
) -> tuple[list[int], int | None]:
    """fan_out_batch on PostgreSQL: one statement builds the batch's rows
    from the members and contacts, Message 1 rendered by the server.

    Nothing crosses the wire but the new ids (the Python path fetched every
    member and sent every row back: a fifth of a batch's time). The same
    members, states, rows and totals as the Python path (a test checks it).
    """
    now = utcnow()
    body, body_params = _template_sql(campaign.message1)
    constants = _message1_constants(campaign.id, now)
    p = database.param
    # `batch` is _PENDING_MEMBERS_SQL (OFFSET 0 for the same plan) plus the
    # verdict per member: 'o' opted out, 's' skipped (not on WhatsApp), 'm'.
    sql = f"""
WITH batch AS MATERIALIZED (
  SELECT cc.id AS member_id, c.id AS contact_id, c.phone, c.name,
         c.variables::json AS v,
         CASE WHEN c.opted_out_at IS NOT NULL THEN 'o'
              WHEN {p} AND c.wa_status = {p} THEN 's' ELSE 'm' END AS verdict
    FROM campaign_contact AS cc JOIN contact AS c ON c.id = cc.contact_id
   WHERE cc.campaign_id = {p} AND cc.state = {p} AND cc.id > {p} AND cc.id <= {p}
     AND NOT EXISTS (SELECT 1 FROM message AS m
                      WHERE m.idempotency_key = {p} || cc.contact_id || '-m1'
                      OFFSET 0)
   ORDER BY cc.id LIMIT {p}
), states AS (
  UPDATE campaign_contact AS cc
     SET state = CASE b.verdict WHEN 'o' THEN {p} ELSE {p} END, updated_at = {p}
    FROM batch AS b WHERE cc.id = b.member_id AND b.verdict <> 'm'
), inserted AS (
  INSERT INTO message ({_MESSAGE_COLUMNS}, {", ".join(constants)})
  SELECT b.contact_id, b.phone, {body}, {p} || b.contact_id || '-m1',
         {", ".join([p] * len(constants))}
    FROM batch AS b WHERE b.verdict = 'm' ORDER BY b.member_id
  ON CONFLICT DO NOTHING RETURNING id
), total AS (
  UPDATE campaign SET message1_total = message1_total + (SELECT COUNT(*) FROM inserted)
   WHERE id = {p}
)
SELECT (SELECT COUNT(*) FROM batch), (SELECT MAX(member_id) FROM batch),
       ARRAY(SELECT id FROM inserted ORDER BY id)
"""
    key_prefix = f"cd-{campaign.id}-"
    params = [
        campaign.skip_invalid,
        WaStatus.INVALID,
        campaign.id,
        MemberState.PENDING,
        after,
        until,
        key_prefix,
        batch_size,
        MemberState.OPTED_OUT,
        MemberState.SKIPPED,
        now,
        *body_params,
        key_prefix,
        *constants.values(),
        campaign.id,
    ]
    count, last, ids = database.execute_sql(sql, params).fetchone()
    if not count:
        return [], None
    return list(ids), (last if count >= batch_size else None)


def _template_sql(template: str) -> tuple[str, list]:
    """A SQL expression over `b` (phone, name, v: the variables as json) that
    renders `template` as render() does, and its parameters.

    `||` makes the body NULL, so the INSERT fails (NOT NULL), when a variable
    is missing, as render() raises KeyError. Variables are text (the import
    stores every value as a string); json ->> returns them as stored.
    """
    parts, params = [], []
    p = database.param
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(f"{p}::text")
            params.append(literal)
        if field is None:
            continue
        if field in _BUILTIN_FIELDS:
            parts.append(f"b.{field}")
        else:
            parts.append(f"(b.v ->> {p})")
            params.append(field)
    return (" || ".join(parts) or "''"), params


def _add_message1_total(campaign_id: int, count: int) -> None:
    # One write per batch (none per send); NULL (a campaign started by an
    # older version) stays NULL and is counted instead.
    if count:
        p = database.param
        database.execute_sql(
            f"UPDATE campaign SET message1_total = message1_total + {p} WHERE id = {p}",
            (count, campaign_id),
        )


# Members still waiting for their Message 1 row, in member id order. `{fence}`
# is "OFFSET 0" on PostgreSQL (see fan_out_batch).
_PENDING_MEMBERS_SQL = (
    "SELECT cc.id, c.id, c.phone, c.name, c.variables, c.opted_out_at, c.wa_status"
    " FROM campaign_contact AS cc JOIN contact AS c ON c.id = cc.contact_id"
    " WHERE cc.campaign_id = {p} AND cc.state = {p} AND cc.id > {p}"
    " AND cc.id <= {p}"
    # The probe is by idempotency key, the only index on that column: with
    # stale statistics, a (campaign, contact, kind) probe was planned on the
    # (campaign, kind, status) index instead, reading every Message 1 of the
    # campaign per member.
    " AND NOT EXISTS (SELECT 1 FROM message AS m"
    " WHERE m.idempotency_key = {p} || cc.contact_id || '-m1'{fence})"
    " ORDER BY cc.id LIMIT {p}"
)
# The columns that differ from row to row; every other column is the same for
# the whole batch (_message1_constants).
_MESSAGE_COLUMNS = "contact_id, phone, body, idempotency_key"


@dataclass(frozen=True)
class _Recipient:
    """What render() reads of a contact."""

    phone: str
    name: str
    variables: dict | None


def _message1_constants(campaign_id: int, now) -> dict[str, object]:
    """Column -> value for the columns a batch's Message 1 rows share.

    The model's defaults (so a column added later with a default needs no
    change here), then what the fan-out sets.
    """
    values: dict[str, object] = {}
    for field in Message._meta.sorted_fields:
        if field.primary_key or field.default is None:
            continue
        default = field.default() if callable(field.default) else field.default
        values[field.column_name] = field.db_value(default)
    values.update(
        campaign_id=campaign_id,
        kind=1,
        status=MessageStatus.QUEUED,
        priority=0,
        created_at=now,
        enqueued_at=now,
    )
    for column in _MESSAGE_COLUMNS.split(", "):
        values.pop(column, None)
    return values


def _insert_message_tuples(
    rows: list[tuple], constants: dict[str, object]
) -> list[int]:
    if not rows:
        return []
    columns = f"{_MESSAGE_COLUMNS}, {', '.join(constants)}"
    p = database.param
    if is_postgres():
        # One array per varying column, the constants once: a plan of a
        # dozen parameters instead of 6000 (half the time of a VALUES list).
        arrays = [list(column) for column in zip(*rows, strict=True)]
        sql = (
            f"INSERT INTO message ({columns}) SELECT u.c, u.p, u.b, u.k, "
            + ", ".join([p] * len(constants))
            + f" FROM unnest({p}::int[], {p}::text[], {p}::text[], {p}::text[])"
            " AS u(c, p, b, k) ON CONFLICT DO NOTHING RETURNING id"
        )
        params = [*constants.values(), *arrays]
        return [row[0] for row in database.execute_sql(sql, params)]
    shared = tuple(constants.values())
    one = "(" + ", ".join([p] * (len(rows[0]) + len(shared))) + ")"
    sql = (
        f"INSERT INTO message ({columns}) VALUES "
        + ", ".join([one] * len(rows))
        + " ON CONFLICT DO NOTHING RETURNING id"
    )
    params = [value for row in rows for value in (*row, *shared)]
    return [row[0] for row in database.execute_sql(sql, params).fetchall()]


def _message_row(campaign: Campaign, contact: Contact, kind: int, now) -> dict:
    template = campaign.message1 if kind == 1 else campaign.message2
    return {
        "campaign": campaign.id,
        "contact": contact.id,
        "phone": contact.phone,
        "kind": kind,
        "body": render(template, contact),
        "status": MessageStatus.QUEUED,
        "priority": PRIORITY_MESSAGE_2 if kind == 2 else 0,
        "idempotency_key": idempotency_key(campaign.id, contact.id, kind),
        "created_at": now,
        "enqueued_at": now,
    }


def _insert_messages(rows: list[dict]) -> list[int]:
    if not rows:
        return []
    query = Message.insert_many(rows).on_conflict_ignore().returning(Message.id)
    return [row[0] for row in query.tuples().execute()]


def _set_member_states(member_ids: list[int], state: str, now) -> None:
    if member_ids:
        CampaignContact.update(state=state, updated_at=now).where(
            CampaignContact.id.in_(member_ids)
        ).execute()


def due_message_ids(campaign_id: int) -> list[int]:
    now = utcnow()
    return [
        m.id
        for m in Message.select(Message.id).where(
            Message.campaign == campaign_id,
            Message.status == MessageStatus.QUEUED,
            Message.next_attempt_at.is_null() | (Message.next_attempt_at <= now),
        )
    ]


# ---------------------------------------------------------------- sending


@dataclass(frozen=True)
class ClaimedMessage:
    """What the send path needs of a claimed row (no ORM object per send)."""

    id: int
    campaign_id: int
    contact_id: int
    kind: int
    phone: str
    body: str
    attempts: int
    failures: int
    idempotency_key: str
    paced_until: dt.datetime | None = None
    created_at: dt.datetime | None = None


# The send path runs these statements thousands of times a second; peewee
# would rebuild their SQL text each time (profiled at ~2 ms of CPU per send),
# so they are written out once. `{p}` is the driver's parameter marker.
_CLAIM_SQL = """
UPDATE message SET status = 'sending', lease_owner = {p}, lease_expires_at = {p},
       attempts = attempts + 1
 WHERE id = {p}
   AND status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= {p})
   AND campaign_id IN (SELECT id FROM campaign WHERE status = 'running')
   AND NOT EXISTS (SELECT 1 FROM contact
                    WHERE contact.id = message.contact_id
                      AND contact.opted_out_at IS NOT NULL)
RETURNING id, campaign_id, contact_id, kind, phone, body, attempts, failures,
          idempotency_key, paced_until, created_at
"""
_RECORD_SENT_SQL = """
UPDATE message SET status = CASE WHEN status = 'sending' THEN 'sent' ELSE status END,
       provider_id = {p}, wa_id = {p}, sent_at = COALESCE(sent_at, {p}),
       lease_owner = NULL, lease_expires_at = NULL, error = NULL, paced_until = NULL
 WHERE id = {p} AND lease_owner = {p}
"""
_MEMBER_SENT_SQL = """
UPDATE campaign_contact SET state = 'message_1_sent',
       message1_sent_at = COALESCE(message1_sent_at, {p}), updated_at = {p}
 WHERE campaign_id = {p} AND contact_id = {p} AND state = 'pending'
"""


def _sql(template: str) -> str:
    return template.replace("{p}", database.param)


def claim(
    message_id: int, owner: str, lease_s: float, now=None
) -> ClaimedMessage | None:
    """Take the row for sending, or None if someone else has it or it is not due."""
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_s)
    cursor = database.execute_sql(_sql(_CLAIM_SQL), (owner, expires, message_id, now))
    row = cursor.fetchone()
    if row is None:
        return None
    # SQLite hands back the stored text: parse it as peewee would.
    return ClaimedMessage(
        *row[:-2],
        Message.paced_until.python_value(row[-2]),
        Message.created_at.python_value(row[-1]),
    )


def contact_opted_out():
    """The row's contact has opted out (a subquery usable in any UPDATE)."""
    return pw.fn.EXISTS(
        Contact.select(Contact.id).where(
            Contact.id == Message.contact, Contact.opted_out_at.is_null(False)
        )
    )


def cancel_if_opted_out(message, owner: str, now=None) -> bool:
    """A held row whose contact opted out meanwhile: cancelled, never re-queued.

    Every path that would give a claimed row back (retry, pacing release,
    pause) goes through here first, so a STOP that arrived while the send
    was in flight is final.
    """
    now = now or utcnow()
    cancelled = (
        Message.update(
            status=MessageStatus.CANCELLED,
            error="contact opted out",
            lease_owner=None,
            lease_expires_at=None,
            paced_until=None,
            next_attempt_at=None,
        )
        .where(held_by(message, owner), contact_opted_out())
        .execute()
    )
    if cancelled:
        maybe_complete(message.campaign_id)
    return bool(cancelled)


def cancel_unclaimable_opted_out(message_id: int, now=None) -> bool:
    """A row the claim refused because its contact opted out: cancel it, so it
    is not swept again and its campaign can complete."""
    now = now or utcnow()
    cancelled = (
        Message.update(
            status=MessageStatus.CANCELLED,
            error="contact opted out",
            lease_owner=None,
            lease_expires_at=None,
            paced_until=None,
            next_attempt_at=None,
        )
        .where(
            Message.id == message_id,
            Message.status == MessageStatus.QUEUED,
            contact_opted_out(),
        )
        .execute()
    )
    if cancelled:
        campaign_id = (
            Message.select(Message.campaign).where(Message.id == message_id).scalar()
        )
        if campaign_id:
            maybe_complete(campaign_id)
    return bool(cancelled)


def release(
    message, owner: str, next_attempt_at, reason: str = "", paced_until=None
) -> bool:
    """Give a claimed row back without counting a failure (pacing, window)."""
    if cancel_if_opted_out(message, owner):
        return False
    return bool(
        Message.update(
            status=MessageStatus.QUEUED,
            next_attempt_at=next_attempt_at,
            paced_until=paced_until,
            lease_owner=None,
            lease_expires_at=None,
            attempts=Message.attempts - 1,
            enqueued_at=utcnow(),
            error=reason or Message.error,
        )
        .where(held_by(message, owner))
        .execute()
    )


def held_by(message, owner: str):
    """The row is still ours: claimed by `owner` and not moved on since."""
    return (
        (Message.id == message.id)
        & (Message.lease_owner == owner)
        & (Message.status == MessageStatus.SENDING)
    )


def record_sent(message, owner: str, provider_id, wa_id, now=None) -> None:
    """The provider accepted the message: sent (unless a webhook got further)."""
    now = now or utcnow()
    # The row and its member move together: a kill between two commits
    # would leave the member behind for good (and the campaign open).
    with database.atomic():
        cursor = database.execute_sql(
            _sql(_RECORD_SENT_SQL), (provider_id, wa_id, now, message.id, owner)
        )
        if cursor.rowcount and message.kind == 1:
            database.execute_sql(
                _sql(_MEMBER_SENT_SQL),
                (now, now, message.campaign_id, message.contact_id),
            )
        elif cursor.rowcount:
            _member_message2_sent(message.campaign_id, message.contact_id, now)
    if cursor.rowcount and message.kind == 2:
        maybe_complete(message.campaign_id)


def _member_after_send(campaign_id: int, contact_id: int, kind: int, now) -> None:
    if kind == 1:
        CampaignContact.update(
            state=MemberState.MESSAGE_1_SENT,
            message1_sent_at=pw.fn.COALESCE(CampaignContact.message1_sent_at, now),
            updated_at=now,
        ).where(
            CampaignContact.campaign == campaign_id,
            CampaignContact.contact == contact_id,
            CampaignContact.state == MemberState.PENDING,
        ).execute()
    else:
        _member_message2_sent(campaign_id, contact_id, now)
        maybe_complete(campaign_id)


def _member_message2_sent(campaign_id: int, contact_id: int, now) -> None:
    CampaignContact.update(state=MemberState.MESSAGE_2_SENT, updated_at=now).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.contact == contact_id,
        CampaignContact.state == MemberState.INTERACTED,
    ).execute()


def repair_members(now=None) -> int:
    """Members left behind their messages (a crash between two commits in an
    older version, or a webhook that moved the row but not the member)."""
    now = now or utcnow()
    sent = Message.select(Message.id).where(
        Message.campaign == CampaignContact.campaign,
        Message.contact == CampaignContact.contact,
        Message.status.in_(_SENT_OR_LATER),
    )
    fixed = (
        CampaignContact.update(state=MemberState.MESSAGE_2_SENT, updated_at=now)
        .where(
            CampaignContact.state == MemberState.INTERACTED,
            pw.fn.EXISTS(sent.where(Message.kind == 2)),
        )
        .execute()
    )
    fixed += (
        CampaignContact.update(
            state=MemberState.MESSAGE_1_SENT,
            message1_sent_at=pw.fn.COALESCE(CampaignContact.message1_sent_at, now),
            updated_at=now,
        )
        .where(
            CampaignContact.state == MemberState.PENDING,
            pw.fn.EXISTS(sent.where(Message.kind == 1)),
        )
        .execute()
    )
    return fixed


def record_failure(message, owner: str, reason: str, now=None) -> bool:
    """Permanent failure: failed with the provider's reason."""
    now = now or utcnow()
    updated = (
        Message.update(
            status=MessageStatus.FAILED,
            error=reason[:2000],
            failed_at=now,
            lease_owner=None,
            lease_expires_at=None,
            paced_until=None,
        )
        .where(held_by(message, owner))
        .execute()
    )
    if updated:
        member_failed(message.campaign_id, message.contact_id, now, message.kind)
        maybe_complete(message.campaign_id)
    return bool(updated)


def expire_message2(message, owner: str, now=None) -> bool:
    """Message 2 claimed after WhatsApp's 24 h window closed (a paused campaign that
    resumed late): WhatsApp would refuse a free-form message, so the row and
    its member expire instead of being sent."""
    now = now or utcnow()
    with database.atomic():
        updated = (
            Message.update(
                status=MessageStatus.EXPIRED,
                error="WhatsApp's 24 h window closed before Message 2 could be sent",
                lease_owner=None,
                lease_expires_at=None,
            )
            .where(held_by(message, owner))
            .execute()
        )
        if updated:
            CampaignContact.update(state=MemberState.EXPIRED, updated_at=now).where(
                CampaignContact.campaign == message.campaign_id,
                CampaignContact.contact == message.contact_id,
                CampaignContact.state == MemberState.INTERACTED,
            ).execute()
    if updated:
        maybe_complete(message.campaign_id)
    return bool(updated)


# The member states a failure of each kind of message ends: a Message 1
# failing after the contact replied (the reply proved it arrived) changes
# nothing for the member.
_FAILS_MEMBER = {
    1: (MemberState.PENDING, MemberState.MESSAGE_1_SENT),
    2: (MemberState.INTERACTED, MemberState.MESSAGE_2_SENT),
}


def member_failed(campaign_id: int, contact_id: int, now, kind: int) -> None:
    CampaignContact.update(state=MemberState.FAILED, updated_at=now).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.contact == contact_id,
        CampaignContact.state.in_(_FAILS_MEMBER[kind]),
    ).execute()


@dataclass(frozen=True)
class Backoff:
    base_s: float
    factor: float
    cap_s: float
    jitter: float

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Delay before the retry after the `failures`-th failure (1-based).

        With base 60, factor 2: 60 s, 120 s, 240 s ... capped at cap_s, then
        up to `jitter` of it added at random.
        """
        raw = min(self.cap_s, self.base_s * self.factor ** max(failures - 1, 0))
        return raw * (1 + self.jitter * (rng or random).random())


def record_retryable(
    message,
    owner: str,
    reason: str,
    delay_s: float,
    max_attempts: int,
    now=None,
) -> dt.datetime | None:
    """A failure that may succeed later: queued again with next_attempt_at.

    Returns the next attempt time, or None when the attempts are used up and
    the message failed instead.
    """
    now = now or utcnow()
    if cancel_if_opted_out(message, owner, now):
        return None
    failures = message.failures + 1
    if failures >= max_attempts:
        record_failure(message, owner, f"{reason} (after {failures} attempts)", now)
        return None
    next_at = now + dt.timedelta(seconds=delay_s)
    updated = (
        Message.update(
            status=MessageStatus.QUEUED,
            failures=failures,
            next_attempt_at=next_at,
            error=reason[:2000],
            lease_owner=None,
            lease_expires_at=None,
            # The slot this attempt used is spent: the retry is paced again.
            paced_until=None,
            enqueued_at=now,
        )
        .where(held_by(message, owner))
        .execute()
    )
    return next_at if updated else None


def process_key(host: str, pid: int) -> str:
    """The start of every lease owner string of one process (host:pid:rand)."""
    return f"{host}:{pid}:"


def held_by_process(key: str):
    return Message.lease_owner.startswith(key) & (
        Message.status == MessageStatus.SENDING
    )


def release_leases(key: str, now=None) -> int:
    """A dead process's rows that provably never left: queued again at once.

    `key` is `process_key(host, pid)`. Only for rows the caller knows were
    not on the wire (see daemon/unconfirmed.py for the others).
    """
    return (
        Message.update(
            status=MessageStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=None,
            enqueued_at=None,
        )
        .where(held_by_process(key))
        .execute()
    )


# ---------------------------------------------------------------- sweeping


@dataclass(frozen=True)
class SweepResult:
    messages: list[tuple[int, int]]  # (id, priority)
    events: list[int]
    campaigns: list[int]


def sweep(
    now=None, grace_s: float = 30.0, limit: int = 5000, include_queued: bool = True
) -> SweepResult:
    """Rows the queue may have lost: due and not enqueued lately.

    Marks them enqueued now; the caller enqueues them. A row that is still in
    the queue as well is harmless: the claim lets one send through. Rows
    abandoned in `sending` (lease expired) become unconfirmed here.
    """
    now = now or utcnow()
    stale = now - dt.timedelta(seconds=grace_s)
    running = Campaign.select(Campaign.id).where(
        Campaign.status == CampaignStatus.RUNNING
    )
    not_recent = Message.enqueued_at.is_null() | (Message.enqueued_at < stale)
    due = (Message.status == MessageStatus.QUEUED) & (
        Message.next_attempt_at.is_null() | (Message.next_attempt_at <= now)
    )
    # A lease that ran out belongs to a worker that died where nobody saw
    # it (another host, a supervisor killed with it): its request may have
    # left, so the row waits for evidence instead of being sent again.
    abandoned = (Message.status == MessageStatus.SENDING) & (
        Message.lease_expires_at < now
    )
    with database.atomic():
        Message.update(
            status=MessageStatus.UNCONFIRMED,
            unconfirmed_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error="worker lost mid-send (lease expired): unconfirmed",
        ).where(abandoned).execute()
    messages = []
    if include_queued:
        messages = _take_lost(due & not_recent, running, now, limit)
    events = [
        e.id
        for e in InboundEvent.select(InboundEvent.id)
        .where(
            InboundEvent.processed_at.is_null(),
            InboundEvent.dead_at.is_null(),
            InboundEvent.received_at < stale,
        )
        .order_by(InboundEvent.id)
        .limit(limit)
    ]
    # Members still waiting for their Message 1 row (not merely for its send).
    has_message1 = Message.select(Message.id).where(
        Message.campaign == CampaignContact.campaign,
        Message.contact == CampaignContact.contact,
        Message.kind == 1,
    )
    pending_members = CampaignContact.select(CampaignContact.campaign).where(
        CampaignContact.state == MemberState.PENDING, ~pw.fn.EXISTS(has_message1)
    )
    campaigns = [
        c.id
        for c in Campaign.select(Campaign.id).where(
            Campaign.status == CampaignStatus.RUNNING,
            Campaign.id.in_(pending_members),
        )
    ]
    return SweepResult(messages=messages, events=events, campaigns=campaigns)


def _take_lost(lost, running, now, limit: int) -> list[tuple[int, int]]:
    """(id, priority) of lost rows, marked enqueued now."""
    with database.atomic():
        query = (
            Message.select(Message.id, Message.priority)
            .where(lost, Message.campaign.in_(running))
            .order_by(Message.id)
            .limit(limit)
        )
        if is_postgres():
            # Two leaders for a moment (lease handover) must not both take
            # the same batch.
            query = query.for_update(skip_locked=True)
        messages = list(query.tuples())
        ids = [m[0] for m in messages]
        for start in range(0, len(ids), _CHUNK):
            Message.update(enqueued_at=now).where(
                Message.id.in_(ids[start : start + _CHUNK])
            ).execute()
    return messages


def running_campaign_ids() -> list[int]:
    return [
        c.id
        for c in Campaign.select(Campaign.id).where(
            Campaign.status == CampaignStatus.RUNNING
        )
    ]


def expire_interactions(window_h: float, now=None) -> int:
    """Message 1 older than the reply window with no reply: the contact expires."""
    now = now or utcnow()
    # A reply that arrived in time but is not processed yet still counts:
    # judge the window at the oldest unprocessed event, not at now. Dead
    # letters are left out: one event that can never be processed must not
    # stop every campaign's expiry.
    oldest_unprocessed = (
        InboundEvent.select(pw.fn.MIN(InboundEvent.received_at))
        .where(InboundEvent.processed_at.is_null(), InboundEvent.dead_at.is_null())
        .scalar()
    )
    if oldest_unprocessed is not None:
        now = min(now, oldest_unprocessed)
    cutoff = now - dt.timedelta(hours=window_h)
    with database.atomic():
        expiring = list(
            CampaignContact.select(CampaignContact.id, CampaignContact.campaign).where(
                CampaignContact.state == MemberState.MESSAGE_1_SENT,
                CampaignContact.message1_sent_at < cutoff,
            )
        )
        _set_member_states([m.id for m in expiring], MemberState.EXPIRED, now)
    for campaign_id in {m.campaign_id for m in expiring}:
        maybe_complete(campaign_id)
    return len(expiring)


# ---------------------------------------------------------------- webhooks


def fold_keyword(text: str) -> str:
    """Upper case without accents or surrounding punctuation: 'Arrêt !' -> 'ARRET'."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return bare.strip().strip(string.punctuation + " ").upper()


def is_opt_out(body: str, keywords: Iterable[str]) -> bool:
    return fold_keyword(body) in {fold_keyword(k) for k in keywords}


@dataclass(frozen=True)
class ReplyOutcome:
    outcome: str
    message2_id: int | None = None


def handle_reply(
    phone: str,
    body: str,
    *,
    is_group: bool,
    window_h: float,
    opt_out_keywords: Iterable[str],
    event_id: int | None = None,
    now=None,
) -> ReplyOutcome:
    """A contact wrote to us: maybe opt them out, maybe create Message 2."""
    now = now or utcnow()
    if is_group:
        return ReplyOutcome("ignored_group")
    contact = Contact.get_or_none(Contact.phone == phone)
    if contact is None:
        return ReplyOutcome("unknown_contact")
    if is_opt_out(body, opt_out_keywords):
        opt_out_contact(contact, f"replied {body.strip()[:40]!r}", now=now)
        _record_interaction(contact, None, event_id, body, "opted_out", now)
        return ReplyOutcome("opted_out")
    if contact.opted_out_at:
        _record_interaction(contact, None, event_id, body, "opted_out_before", now)
        return ReplyOutcome("opted_out_before")
    with database.atomic():
        member = _open_member_for_reply(contact, window_h, now)
        if member is None:
            answered = _answered_member(contact)
            if answered is not None:
                _record_interaction(contact, answered, event_id, body, "already", now)
                return ReplyOutcome("already_interacted")
            _record_interaction(contact, None, event_id, body, "no_open_campaign", now)
            return ReplyOutcome("no_open_campaign")
        took = (
            CampaignContact.update(
                state=MemberState.INTERACTED, interacted_at=now, updated_at=now
            )
            .where(
                CampaignContact.id == member.id,
                CampaignContact.state.in_(_REPLYABLE_STATES),
            )
            .execute()
        )
        campaign = member.campaign
        if not took:
            _record_interaction(contact, campaign, event_id, body, "already", now)
            return ReplyOutcome("already_interacted")
        _confirm_message1_by_reply(campaign.id, contact.id, now)
        ids = _insert_messages([_message_row(campaign, contact, 2, now)])
        _record_interaction(contact, campaign, event_id, body, "message_2", now)
    return ReplyOutcome("message_2_queued", ids[0] if ids else None)


def _open_member_for_reply(contact: Contact, window_h: float, now):
    """The member this reply answers: latest Message 1 sent within the window."""
    cutoff = now - dt.timedelta(hours=window_h)
    message1 = Message.alias()
    candidates = (
        CampaignContact.select(CampaignContact, Campaign)
        .join(Campaign)
        .switch(CampaignContact)
        .join(
            message1,
            on=(
                (message1.campaign == CampaignContact.campaign)
                & (message1.contact == CampaignContact.contact)
                & (message1.kind == 1)
            ),
        )
        .where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(_REPLYABLE_STATES),
            Campaign.status.in_((CampaignStatus.RUNNING, CampaignStatus.PAUSED)),
            # A reply proves the provider took Message 1 whatever we know of
            # the attempt: unconfirmed, queued for a retry, or a worker that
            # died before recording it (status still 'sending').
            message1.status.in_(_ATTEMPTED)
            | ((message1.status == MessageStatus.QUEUED) & (message1.attempts > 0)),
            message1.sent_at.is_null() | (message1.sent_at >= cutoff),
            message1.created_at >= cutoff - dt.timedelta(days=30),
        )
        .order_by(message1.id.desc())
        .limit(1)
    )
    return candidates.first()


def _answered_member(contact: Contact) -> Campaign | None:
    """The open campaign in which this contact already replied (a second
    reply: recorded against it, and no second Message 2)."""
    member = (
        CampaignContact.select(CampaignContact, Campaign)
        .join(Campaign)
        .where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(
                (MemberState.INTERACTED, MemberState.MESSAGE_2_SENT)
            ),
            Campaign.status.in_((CampaignStatus.RUNNING, CampaignStatus.PAUSED)),
        )
        .order_by(CampaignContact.id.desc())
        .first()
    )
    return member.campaign if member else None


def _confirm_message1_by_reply(campaign_id: int, contact_id: int, now) -> None:
    """A person answering proves Message 1 reached them: an unconfirmed row,
    or one queued for a retry, is sent, and the retry is off. A row still in
    `sending` is left to the worker that holds it (it records the outcome)."""
    Message.update(
        status=MessageStatus.SENT,
        sent_at=pw.fn.COALESCE(Message.sent_at, Message.unconfirmed_at, now),
        next_attempt_at=None,
        paced_until=None,
        error=None,
    ).where(
        Message.campaign == campaign_id,
        Message.contact == contact_id,
        Message.kind == 1,
        Message.status.in_((MessageStatus.UNCONFIRMED, MessageStatus.QUEUED)),
    ).execute()
    CampaignContact.update(
        message1_sent_at=pw.fn.COALESCE(CampaignContact.message1_sent_at, now)
    ).where(
        CampaignContact.campaign == campaign_id,
        CampaignContact.contact == contact_id,
    ).execute()


def _record_interaction(contact, campaign, event_id, body, outcome, now) -> None:
    Interaction.create(
        contact=contact.id,
        campaign=campaign.id if campaign else None,
        event=event_id,
        body=(body or "")[:4000],
        outcome=outcome,
        received_at=now,
    )


def opt_out_contact(contact: Contact, reason: str, now=None) -> None:
    """The contact gets nothing more from any campaign, now or later."""
    now = now or utcnow()
    affected = [
        m.campaign_id
        for m in CampaignContact.select(CampaignContact.campaign).where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(tuple(MemberState.OPEN)),
        )
    ]
    with database.atomic():
        Contact.update(opted_out_at=pw.fn.COALESCE(Contact.opted_out_at, now)).where(
            Contact.id == contact.id
        ).execute()
        CampaignContact.update(state=MemberState.OPTED_OUT, updated_at=now).where(
            CampaignContact.contact == contact.id,
            CampaignContact.state.in_(tuple(MemberState.OPEN)),
        ).execute()
        Message.update(
            status=MessageStatus.CANCELLED, error=f"opted out: {reason}"
        ).where(
            Message.contact == contact.id, Message.status == MessageStatus.QUEUED
        ).execute()
    for campaign_id in affected:
        maybe_complete(campaign_id)
    log.info("contact %s opted out (%s)", contact.phone, reason)


def find_message(reference=None, provider_id=None, wa_id=None) -> Message | None:
    if reference:
        found = Message.get_or_none(Message.idempotency_key == reference)
        if found:
            return found
    for field, value in ((Message.provider_id, provider_id), (Message.wa_id, wa_id)):
        if value:
            found = Message.get_or_none(field == value)
            if found:
                return found
    if provider_id:
        return Message.get_or_none(Message.wa_id == provider_id)
    return None


def apply_status(
    message: Message, status: str, *, error: str | None = None, now=None
) -> bool:
    """Move a message forward to `status`; never backwards. True if it moved."""
    now = now or utcnow()
    if status == MessageStatus.FAILED:
        return _apply_failed_status(message, error or "failed", now)
    rank = MessageStatus.RANK.get(status)
    if rank is None or rank < MessageStatus.RANK["sent"]:
        return False
    lower = [s for s, r in MessageStatus.RANK.items() if r < rank]
    values = {"status": status, "sent_at": pw.fn.COALESCE(Message.sent_at, now)}
    if status in ("delivered", "read"):
        values["delivered_at"] = pw.fn.COALESCE(Message.delivered_at, now)
    if status == "read":
        values["read_at"] = pw.fn.COALESCE(Message.read_at, now)
    moved = (
        Message.update(**values)
        .where(Message.id == message.id, Message.status.in_(lower))
        .execute()
    )
    if moved and message.status in _OPEN_MESSAGE_STATUSES:
        _member_after_send(message.campaign_id, message.contact_id, message.kind, now)
    return bool(moved)


def _apply_failed_status(message: Message, error: str, now) -> bool:
    # "failed" after "delivered" happens (out-of-order webhooks): the
    # contact has the message, so we keep the better status.
    moved = (
        Message.update(status=MessageStatus.FAILED, error=error[:2000], failed_at=now)
        .where(
            Message.id == message.id,
            Message.status.in_(_OPEN_MESSAGE_STATUSES + ("sent",)),
        )
        .execute()
    )
    if moved:
        member_failed(message.campaign_id, message.contact_id, now, message.kind)
        maybe_complete(message.campaign_id)
    return bool(moved)
