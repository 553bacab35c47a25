"""The fan-out: a running campaign's Message 1 rows, one batch at a time."""

from __future__ import annotations

import string

from daemon.domain.campaigns.common import _CHUNK
from daemon.domain.campaigns.common import PRIORITY_MESSAGE_2
from daemon.domain.campaigns.common import idempotency_key
from daemon.domain.campaigns.templates import _BUILTIN_FIELDS
from daemon.domain.campaigns.templates import _Recipient
from daemon.domain.campaigns.templates import render
from daemon.store.db import is_postgres
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import MemberState
from daemon.store.models import Message
from daemon.store.models import MessageStatus
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow


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
