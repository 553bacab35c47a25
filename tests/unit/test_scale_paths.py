"""The million-contact paths give the results of the small ones (issue 12).

- create_campaign reads contacts in chunks and writes members with INSERT ...
  SELECT: the same members, states and errors as loading every contact;
- on PostgreSQL one statement makes a fan-out batch (Message 1 rendered by
  the server): the same rows and member states as the Python path;
- `campaign show` derives pending members and queued Message 1 rows from the
  campaign's totals: the same counts as counting them;
- the CLI and API imports stream: the same report as the merged import.
"""

from __future__ import annotations

import pytest

from daemon.domain import campaigns
from daemon.domain.campaigns import fanout
from daemon.domain.campaigns import lifecycle
from daemon.domain.contacts import import_csv_text
from daemon.domain.contacts import import_rows
from daemon.domain.contacts import parse_csv_text
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.send_helpers import close_db
from tests.send_helpers import open_db
from tests.send_helpers import seed_contacts

M1 = "Bonjour {name} de {city}"
M2 = "Merci {name} !"


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, make_config):
    if request.param == "sqlite":
        cfg = make_config("sqlite")
    else:
        cfg = make_config(
            "sqlite", {"database": {"url": request.getfixturevalue("pg_url")}}
        )
    opened = open_db(cfg)
    yield opened
    close_db(opened)


def members_of(campaign_id: int) -> list[tuple[int, str]]:
    query = CampaignContact.select(CampaignContact.contact, CampaignContact.state)
    query = query.where(CampaignContact.campaign == campaign_id)
    return sorted((m.contact_id, m.state) for m in query)


def test_create_campaign_in_chunks_makes_the_same_members(db, monkeypatch):
    monkeypatch.setattr(lifecycle, "_MEMBER_CHUNK", 7)
    ids = seed_contacts(40)
    opted = ids[3::5]
    Contact.update(opted_out_at=utcnow(), variables={}).where(
        Contact.id.in_(opted)
    ).execute()
    expected = sorted((i, "opted_out" if i in opted else "pending") for i in ids)

    every = campaigns.create_campaign("all", M1, M2, None)
    assert members_of(every.id) == expected
    assert Campaign.get_by_id(every.id).members_total == 40

    some = ids[::3] + ids[::3]  # repeated ids count once
    listed = campaigns.create_campaign("some", M1, M2, some)
    assert members_of(listed.id) == [m for m in expected if m[0] in set(some)]
    summary = campaigns.campaign_summary(listed.id)
    assert summary["contacts"] == len(set(some))
    assert summary["members"]["pending"] == len(set(some) - set(opted))


def test_create_campaign_errors_are_the_same(db, monkeypatch):
    monkeypatch.setattr(lifecycle, "_MEMBER_CHUNK", 4)
    ids = seed_contacts(20)
    Contact.update(variables={}).where(Contact.id.in_([ids[5], ids[9]])).execute()
    before = Campaign.select().count()
    with pytest.raises(InputError) as caught:
        campaigns.create_campaign("x", M1, M2, ids)
    phone = Contact.get_by_id(ids[5]).phone
    assert str(caught.value) == (
        f"template variable {{city}} is missing for contact {phone}"
    )
    # A contact that does not exist wins, even in a later chunk.
    missing = ids[-1] + 100
    with pytest.raises(NotFoundError, match=f"contact {missing} does not exist"):
        campaigns.create_campaign("x", M1, M2, [*ids, missing, missing + 1])
    with pytest.raises(NotFoundError, match=f"contact {missing} does not exist"):
        campaigns.create_campaign("x", M1, M2, [missing, *ids])
    assert Campaign.select().count() == before
    assert CampaignContact.select().count() == 0
    # Opted out: its variables do not matter.
    Contact.update(opted_out_at=utcnow()).where(
        Contact.id.in_([ids[5], ids[9]])
    ).execute()
    assert campaigns.create_campaign("x", M1, M2, None).members_total == 20


def _fan_out_all(campaign_id: int, batch: int) -> list[tuple]:
    after, calls = 0, []
    while after is not None:
        ids, after = campaigns.fan_out_batch(campaign_id, batch, after)
        calls.append((len(ids), after is None))
    return calls


def _rows(campaign_id: int) -> list[tuple]:
    query = Message.select().where(Message.campaign == campaign_id)
    rows = []
    for m in query.order_by(Message.id):
        row = {k: v for k, v in m.__data__.items() if k not in ("id", "campaign")}
        row["idempotency_key"] = row["idempotency_key"].replace(
            f"cd-{campaign_id}-", "cd-C-"
        )
        row.pop("created_at"), row.pop("enqueued_at")
        rows.append(tuple(sorted(row.items())))
    return rows


def test_the_postgres_fan_out_statement_matches_the_python_path(
    make_config, pg_url, monkeypatch
):
    db = open_db(make_config("sqlite", {"database": {"url": pg_url}}))
    try:
        ids = seed_contacts(23)
        Contact.update(opted_out_at=utcnow()).where(Contact.id == ids[2]).execute()
        Contact.update(wa_status=WaStatus.INVALID).where(
            Contact.id.in_([ids[4], ids[7]])
        ).execute()
        Contact.update(
            name="O'Brien %s {x}", variables={"city": "Saint-Étienne ' %% {y}"}
        ).where(Contact.id == ids[9]).execute()
        template = "{{Bonjour}} {name}, {city}! {phone} 100%"
        results = {}
        for path in ("sql", "python"):
            c = campaigns.create_campaign(path, template, M2, ids)
            Campaign.update(status="running", message1_total=0).where(
                Campaign.id == c.id
            ).execute()
            with monkeypatch.context() as patch:
                if path == "python":
                    patch.setattr(fanout, "is_postgres", lambda: False)
                calls = _fan_out_all(c.id, 5)
            results[path] = (
                calls,
                _rows(c.id),
                [s for _, s in members_of(c.id)],
                Campaign.get_by_id(c.id).message1_total,
            )
        assert results["sql"] == results["python"]
        calls, rows, states, total = results["sql"]
        assert total == 20 == len(rows)
        assert states.count("opted_out") == 1 and states.count("skipped") == 2
        by_contact = {dict(r)["contact"]: dict(r)["body"] for r in rows}
        body = by_contact[ids[9]]
        assert body.startswith("{Bonjour} O'Brien %s {x}, Saint-Étienne ' %% {y}! +")
        # A contact lacking a variable fails the batch, as render() does.
        Contact.update(variables={}).where(Contact.id == ids[0]).execute()
        c = campaigns.create_campaign("late", "{name}", M2, ids)
        Campaign.update(status="running", message1_total=0).where(
            Campaign.id == c.id
        ).execute()
        Campaign.update(message1=M1).where(Campaign.id == c.id).execute()
        with pytest.raises(Exception, match="null value"):
            campaigns.fan_out_batch(c.id, 5, 0)
    finally:
        close_db(db)


def test_campaign_show_derives_the_big_counts_from_the_totals(db):
    ids = seed_contacts(12)
    c = campaigns.create_campaign("x", M1, M2, ids)
    Campaign.update(status="running", message1_total=0).where(
        Campaign.id == c.id
    ).execute()
    _fan_out_all(c.id, 5)
    Message.update(status="sent").where(Message.contact.in_(ids[:3])).execute()
    CampaignContact.update(state="message_1_sent").where(
        CampaignContact.contact.in_(ids[:3])
    ).execute()
    derived = campaigns.campaign_summary(c.id)
    assert derived["members"] == {"pending": 9, "message_1_sent": 3}
    assert derived["messages"]["message1"] == {"queued": 9, "sent": 3}
    # Unknown totals (a campaign made by an older version): counted.
    Campaign.update(members_total=None, message1_total=None).where(
        Campaign.id == c.id
    ).execute()
    assert campaigns.campaign_summary(c.id) == derived


def test_csv_text_import_streams_to_the_same_result(db):
    Contact.create(phone="+33612345681", name="Old", variables={"vip": "yes"})
    text = (
        "\ufeffphone;name;city\n06 12 34 56 78;Ann;Paris\nbad;X;Y\n"
        "+33612345681;;Lyon\n0612345678;Ann B;\n07 81 22 33 44;Bob;Nice\n"
    )
    parsed, result = import_csv_text(text, "FR", with_ids=True)
    phones = [Contact.get_by_id(i).phone for i in result.contact_ids]
    assert phones == ["+33612345678", "+33612345681", "+33781223344"]
    assert (result.created, result.updated) == (2, 1)
    assert parsed.duplicates_merged == 1
    assert parsed.errors == [(3, parse_csv_text(text).errors[0][1])]
    with database.atomic() as txn:
        classic = import_rows(parse_csv_text(text).rows)
        txn.rollback()
    assert classic.contact_ids == result.contact_ids
    assert Contact.get(Contact.phone == "+33612345678").name == "Ann B"
