"""The admin API's number checks: start them for a campaign or for contacts
(202, what was queued and the ETA), see them on the campaign and the contact;
bad input is a 4xx with a JSON reason. Every answer is checked against the
served OpenAPI document (tests.integration.test_api.Api)."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.store.models import Contact
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.integration.test_api import TOKEN
from tests.integration.test_api import Api
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(90)

CAMPAIGN = "/api/v1/campaigns/{campaign_id}"
VERIFY = "/api/v1/contacts/verify"


@pytest.fixture(params=["sqlite", "cluster"])
def api(request, make_config):
    extra = {"web": {"api_token": TOKEN}, "campaigns": {"verify_per_minute": 60.0}}
    cfg = mode_config(request, make_config, request.param, extra)
    client = Api(cfg)
    yield client
    client.close()


def _instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.removesuffix("Z"))


def _seed(api):
    """Four contacts in a campaign, the last opted out."""
    with database.connection_context():
        ids = seed_contacts(4)
        Contact.update(opted_out_at=utcnow()).where(Contact.id == ids[3]).execute()
        campaign = new_campaign(ids)
    return ids, campaign.id


def test_verify_a_campaign_then_see_it(api):
    ids, cid = _seed(api)
    path = f"/api/v1/campaigns/{cid}"
    before = api.call("GET", path, CAMPAIGN).json()["verification"]
    assert before == {
        "pending": 0,
        "valid": 0,
        "invalid": 0,
        "unknown": 0,
        "unchecked": 4,
        "eta": None,
    }

    started = api.call("POST", path + "/verify", CAMPAIGN + "/verify")
    assert started.status_code == 202, started.text
    body = started.json()
    assert (body["queued"], body["already_pending"], body["opted_out"]) == (3, 0, 1)
    assert body["verify_per_minute"] == 60.0
    assert body["verification"]["pending"] == 3
    assert body["verification"]["eta"].endswith("Z")
    assert api.queues.verification.pending_count() == 3

    shown = api.call("GET", path, CAMPAIGN).json()["verification"]
    assert (shown["pending"], shown["unchecked"]) == (3, 1)
    # No worker runs the checks here, so they fall behind their pace and the
    # ETA moves with the clock; shown to the second, it can tick over between
    # the two calls, never go back.
    late_by = _instant(shown["eta"]) - _instant(body["verification"]["eta"])
    assert dt.timedelta(0) <= late_by <= dt.timedelta(seconds=1)

    contact = api.call(
        "GET", f"/api/v1/contacts/{ids[0]}", "/api/v1/contacts/{ref}"
    ).json()
    assert contact["check"]["status"] == "pending"
    assert contact["check"]["attempts"] == 0
    assert contact["wa_status"] == "unknown"
    never = api.call(
        "GET", f"/api/v1/contacts/{ids[3]}", "/api/v1/contacts/{ref}"
    ).json()
    assert never["check"] is None

    again = api.call("POST", path + "/verify", CAMPAIGN + "/verify").json()
    assert (again["queued"], again["already_pending"]) == (0, 3)

    missing = api.call("POST", "/api/v1/campaigns/999/verify", CAMPAIGN + "/verify")
    assert missing.status_code == 404
    assert "999" in missing.json()["description"]
    with_body = api.call(
        "POST", path + "/verify", CAMPAIGN + "/verify", json={"now": True}
    )
    assert with_body.status_code == 400
    assert "unknown field 'now'" in with_body.json()["description"]


def test_verify_contacts_by_id_or_all_unknown(api):
    ids, _ = _seed(api)
    started = api.call("POST", VERIFY, json={"contact_ids": [ids[0], ids[0], ids[3]]})
    assert started.status_code == 202, started.text
    body = started.json()
    assert (body["queued"], body["opted_out"]) == (1, 1)
    assert body["verification"]["pending"] == 1
    assert body["verification"]["unchecked"] == 1

    everyone = api.call("POST", VERIFY, json={"all_unknown": True})
    assert everyone.status_code == 202
    body = everyone.json()
    # ids[0] is pending already; ids[1], ids[2] unknown; ids[3] opted out.
    assert (body["queued"], body["already_pending"]) == (2, 1)
    assert body["verification"]["pending"] == 3


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({}, 400, "either 'contact_ids' or 'all_unknown'"),
        ({"contact_ids": [1], "all_unknown": True}, 400, "either"),
        ({"contact_ids": []}, 400, "is empty"),
        ({"contact_ids": "1,2"}, 400, "list of positive ids"),
        ({"contact_ids": [0]}, 400, "list of positive ids"),
        ({"contact_ids": [True]}, 400, "list of positive ids"),
        ({"all_unknown": False}, 400, "must be true"),
        ({"all_unknown": "yes"}, 400, "true or false"),
        ({"contacts": [1]}, 400, "unknown field 'contacts'"),
        ({"contact_ids": [424242]}, 404, "no contact with id 424242"),
    ],
)
def test_bad_verify_bodies_are_a_json_4xx(api, body, status, reason):
    answer = api.call("POST", VERIFY, json=body)
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["description"]
    assert api.queues.verification.pending_count() == 0


def test_a_verify_body_that_is_not_json_is_a_400(api):
    answer = api.call(
        "POST",
        VERIFY,
        data=b"contact_ids=1",
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 400
    assert answer.json()["title"]
