"""Webhook parsers on the captured payloads, and on garbage (never raise)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from daemon.errors import ConfigError
from daemon.providers import webhook_parser
from daemon.providers.base import IgnoredEvent
from daemon.providers.base import InboundMessage
from daemon.providers.base import StatusUpdate

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "providers"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def only(parser, body) -> tuple[str, object]:
    items = parser.split(body)
    assert len(items) == 1
    key, item = items[0]
    return key, parser.parse(item)


# --- Wassenger ----------------------------------------------------------------

WAS = webhook_parser("wassenger")


def test_wassenger_inbound_real_payload():
    key, event = only(WAS, load("wassenger_message_in_new.json"))
    assert key == "message:in:new:ACB19255F805BFD6139C144316DE574F:delivered"
    assert event == InboundMessage(
        from_phone="+5215617354008",
        body="El instrumental que tiene cinta rosita es de Romina (la hija del doc)",
        provider_message_id="ACB19255F805BFD6139C144316DE574F",
        timestamp=1765642500.0,
        is_group=False,
    )


def test_wassenger_inbound_phone_fallbacks():
    body = load("wassenger_message_in_new.json")
    del body["data"]["fromNumber"]
    assert only(WAS, body)[1].from_phone == "+5215617354008"  # chat.contact.phone
    del body["data"]["chat"]["contact"]
    assert only(WAS, body)[1].from_phone == "+5215617354008"  # from, @c.us stripped
    body["data"]["from"] = "garbage"
    assert isinstance(only(WAS, body)[1], IgnoredEvent)


@pytest.mark.parametrize(
    "change",
    [
        {"chat": {"type": "group"}},
        {"meta": {"isGroup": True}},
        {"from": "120363043051234567@g.us", "chat": {}},
    ],
)
def test_wassenger_inbound_group(change):
    body = load("wassenger_message_in_new.json")
    body["data"].update(change)
    if "chat" in change and not change["chat"]:
        body["data"]["fromNumber"] = "+5215617354008"
    event = only(WAS, body)[1]
    assert isinstance(event, InboundMessage) and event.is_group


def test_wassenger_inbound_timestamp_fallbacks():
    body = load("wassenger_message_in_new.json")
    body["data"]["timestamp"] = "1765642501"  # number as a string
    assert only(WAS, body)[1].timestamp == 1765642501.0
    del body["data"]["timestamp"]
    assert only(WAS, body)[1].timestamp == 1765642500.0  # from data.date
    del body["data"]["date"]
    body["created"] = 1765642599
    assert only(WAS, body)[1].timestamp == 1765642599.0


def test_wassenger_inbound_media_caption_and_no_body():
    body = load("wassenger_message_in_new.json")
    body["data"]["body"] = None
    body["data"]["media"] = {"caption": "look"}
    assert only(WAS, body)[1].body == "look"
    del body["data"]["media"]
    assert only(WAS, body)[1].body == ""


def test_wassenger_ack_read():
    key, event = only(WAS, load("wassenger_message_out_ack.json"))
    assert key == "message:out:ack:3EB0C767D26A1D0A7A8B:read"
    assert event == StatusUpdate(
        status="read",
        reference="camp42:contact981:m1",
        provider_message_id="3EB0C767D26A1D0A7A8B",
        wa_id="3EB0C767D26A1D0A7A8B",
        error=None,
        error_code=None,
        timestamp=1765643000.0,
    )


def test_wassenger_out_new_is_sent():
    event = only(WAS, load("wassenger_message_out_new.json"))[1]
    assert isinstance(event, StatusUpdate)
    assert (event.status, event.reference) == ("sent", "camp42:contact981:m1")


def test_wassenger_failed_with_error_object():
    event = only(WAS, load("wassenger_message_out_failed.json"))[1]
    assert isinstance(event, StatusUpdate)
    assert event.status == "failed"
    assert event.error == "Recipient phone number is not on WhatsApp"
    assert event.error_code == "invalid_phone"
    assert event.reference == "camp42:contact982:m1"


def test_wassenger_failed_with_error_string():
    body = load("wassenger_message_out_failed.json")
    body["data"]["error"] = "Number banned"
    event = only(WAS, body)[1]
    assert (event.status, event.error, event.error_code) == (
        "failed",
        "Number banned",
        None,
    )


@pytest.mark.parametrize(
    "ack, status",
    [
        ("server", "sent"),
        ("device", "sent"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("read", "read"),
        ("played", "read"),
        ("failed", "failed"),
        ("error", "failed"),
        ("READ", "read"),
    ],
)
def test_wassenger_ack_vocabulary(ack, status):
    body = load("wassenger_message_out_ack.json")
    body["data"]["ack"] = ack
    assert only(WAS, body)[1].status == status


@pytest.mark.parametrize(
    "event, status",
    [
        ("message:out:delivered", "delivered"),
        ("message:out:read", "read"),
        ("message:out:sent", "sent"),
        ("message:out:failed", "failed"),
    ],
)
def test_wassenger_event_implies_status_without_ack(event, status):
    body = load("wassenger_message_out_ack.json")
    body["event"] = event
    del body["data"]["ack"]
    key, parsed = only(WAS, body)
    assert key == f"{event}:3EB0C767D26A1D0A7A8B:"
    assert parsed.status == status


def test_wassenger_pending_ack_and_other_events_are_ignored():
    body = load("wassenger_message_out_ack.json")
    body["data"]["ack"] = "pending"
    assert isinstance(only(WAS, body)[1], IgnoredEvent)
    body["event"] = "message:out:ack"
    del body["data"]["ack"]
    assert isinstance(only(WAS, body)[1], IgnoredEvent)
    for event in ("message:update", "number:session", "chat:update"):
        body = load("wassenger_message_out_ack.json")
        body["event"] = event
        parsed = only(WAS, body)[1]
        assert isinstance(parsed, IgnoredEvent) and event in parsed.reason


def test_wassenger_numbers_as_strings_and_ints():
    body = load("wassenger_message_out_ack.json")
    body["data"]["reference"] = 42
    body["data"]["id"] = 12345
    key, event = only(WAS, body)
    assert key == "message:out:ack:12345:read"
    assert (event.reference, event.provider_message_id) == ("42", "12345")


# --- Meta -----------------------------------------------------------------------

META = webhook_parser("meta")


def test_meta_text_message():
    key, event = only(META, load("meta_message_text.json"))
    wamid = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
    assert key == f"msg:{wamid}"
    assert event == InboundMessage(
        from_phone="+16505551234",
        body="Does it come in another color?",
        provider_message_id=wamid,
        timestamp=1749416383.0,
        is_group=False,
    )


@pytest.mark.parametrize(
    "message, body",
    [
        ({"type": "button", "button": {"text": "Oui", "payload": "YES"}}, "Oui"),
        (
            {
                "type": "interactive",
                "interactive": {
                    "type": "button_reply",
                    "button_reply": {"title": "Ok"},
                },
            },
            "Ok",
        ),
        (
            {
                "type": "interactive",
                "interactive": {"type": "list_reply", "list_reply": {"title": "B"}},
            },
            "B",
        ),
        ({"type": "image", "image": {"id": "1"}}, ""),
    ],
)
def test_meta_non_text_messages(message, body):
    payload = load("meta_message_text.json")
    msg = payload["entry"][0]["changes"][0]["value"]["messages"][0]
    del msg["text"]
    msg.update(message)
    event = only(META, payload)[1]
    assert isinstance(event, InboundMessage) and event.body == body


def test_meta_system_messages_are_not_replies():
    payload = load("meta_message_text.json")
    msg = payload["entry"][0]["changes"][0]["value"]["messages"][0]
    del msg["text"]
    msg.update(
        type="system",
        system={
            "body": "User A changed from 16505551234 to 16505559999",
            "new_wa_id": "16505559999",
            "type": "user_changed_number",
        },
    )
    event = only(META, payload)[1]
    assert event == IgnoredEvent("meta system message (user_changed_number)")


def test_meta_delivered_status():
    key, event = only(META, load("meta_status_delivered.json"))
    wamid = "wamid.HBgNNTUxNjk5MjMxODIyMhUCABEYEjgxQkVFRDVBQTVDODFDOTg3MQA="
    assert key == f"status:{wamid}:delivered"
    assert event == StatusUpdate(
        status="delivered",
        reference=None,
        provider_message_id=wamid,
        wa_id=wamid,
        error=None,
        error_code=None,
        timestamp=1750857384.0,
    )


def test_meta_failed_status_with_reference_and_error():
    key, event = only(META, load("meta_status_failed.json"))
    assert key == "status:wamid.123:failed"
    assert event.status == "failed"
    assert event.reference == "camp42:contact981:m1"
    assert event.error == "Message undeliverable: Recipient not reachable"
    assert event.error_code == 131026


def test_meta_batch_splits_into_items():
    body = load("meta_message_text.json")
    value = body["entry"][0]["changes"][0]["value"]
    second = copy.deepcopy(value["messages"][0])
    second["id"] = "wamid.second"
    value["messages"].append(second)
    statuses = load("meta_status_delivered.json")["entry"][0]["changes"][0]["value"]
    value["statuses"] = statuses["statuses"] + [
        dict(statuses["statuses"][0], status="read")
    ]
    body["entry"].append(load("meta_status_failed.json")["entry"][0])
    items = META.split(body)
    keys = [k for k, _ in items]
    assert len(keys) == 5 and len(set(keys)) == 5
    kinds = [type(META.parse(item)).__name__ for _, item in items]
    assert kinds.count("InboundMessage") == 2 and kinds.count("StatusUpdate") == 3
    # Items are JSON (the web layer stores them) and carry their metadata.
    for _, item in items:
        assert json.loads(json.dumps(item)) == item
        assert "phone_number_id" in item["metadata"]


def test_meta_played_maps_to_read_and_unknown_status_is_ignored():
    body = load("meta_status_delivered.json")
    status = body["entry"][0]["changes"][0]["value"]["statuses"][0]
    status["status"] = "played"
    assert only(META, body)[1].status == "read"
    status["status"] = "deleted"
    assert isinstance(only(META, body)[1], IgnoredEvent)


def test_meta_other_fields_and_async_errors_are_ignored():
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {"field": "message_template_status_update", "value": {"e": 1}},
                    {
                        "field": "messages",
                        "value": {"errors": [{"code": 131000, "title": "Oops"}]},
                    },
                ],
            }
        ],
    }
    items = META.split(body)
    assert len(items) == 2
    assert all(key.startswith("unknown:") for key, _ in items)
    reasons = [META.parse(item).reason for _, item in items]
    assert "message_template_status_update" in reasons[0]
    assert "131000" in reasons[1]


# --- shared: garbage never raises -----------------------------------------------

GARBAGE = [
    {},
    {"event": None},
    {"event": "message:in:new"},
    {"event": "message:in:new", "data": "x"},
    {"event": "message:in:new", "data": {"id": 1}},
    {"event": "message:out:ack", "data": {"id": "x", "ack": 3}},
    {"event": ["message:in:new"], "data": {"id": "x"}},
    {"event": "message:in:new", "data": {"id": "x", "fromNumber": {"a": 1}}},
    {"object": "whatsapp_business_account"},
    {"object": "whatsapp_business_account", "entry": "nope"},
    {"entry": [{"changes": [{"field": "messages", "value": {"messages": [{}]}}]}]},
    {"entry": [{"changes": [{"field": "messages", "value": {"statuses": [1, {}]}}]}]},
    {"entry": [{"changes": [{"value": {"messages": [{"from": 336, "id": 5}]}}]}]},
    {"entry": [None, 1, {"changes": None}]},
    [],
    [1, 2],
    "text",
    42,
    None,
]


def assert_handled(event) -> None:
    """An event, reached by shape checks rather than the catch-all guard."""
    assert isinstance(event, InboundMessage | StatusUpdate | IgnoredEvent)
    if isinstance(event, IgnoredEvent):
        assert not event.reason.startswith("unparsable"), event.reason


@pytest.mark.parametrize("kind", ["wassenger", "meta"])
@pytest.mark.parametrize("body", GARBAGE, ids=lambda b: json.dumps(b)[:40])
def test_garbage_never_raises(kind, body):
    parser = webhook_parser(kind)
    items = parser.split(body)
    assert items, "split always gives at least one item"
    for key, item in items:
        assert isinstance(key, str) and key
        assert isinstance(item, dict)
        assert_handled(parser.parse(item))


@pytest.mark.parametrize("kind", ["wassenger", "meta"])
def test_unknown_shapes_get_a_stable_hash_key(kind):
    parser = webhook_parser(kind)
    a = parser.split({"hello": "world", "n": 1})
    b = parser.split({"n": 1, "hello": "world"})
    assert a == b and a[0][0].startswith("unknown:")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "event",
                    "data",
                    "id",
                    "ack",
                    "from",
                    "fromNumber",
                    "chat",
                    "entry",
                    "changes",
                    "value",
                    "messages",
                    "statuses",
                    "status",
                    "timestamp",
                    "errors",
                    "text",
                    "body",
                    "meta",
                    "reference",
                    "error",
                    "x",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(body=JSON, kind=st.sampled_from(["wassenger", "meta"]))
def test_random_json_never_raises(body, kind):
    parser = webhook_parser(kind)
    for _key, item in parser.split(body):
        assert_handled(parser.parse(item))


@settings(max_examples=100, deadline=None)
@given(data=st.dictionaries(st.text(max_size=8), JSON, max_size=5))
def test_mutated_real_payloads_never_raise(data):
    for kind, name in [
        ("wassenger", "wassenger_message_in_new.json"),
        ("meta", "meta_status_failed.json"),
    ]:
        parser = webhook_parser(kind)
        body = load(name)
        if kind == "wassenger":
            body["data"].update(data)
        else:
            body["entry"][0]["changes"][0]["value"]["statuses"][0].update(data)
        for _key, item in parser.split(body):
            assert_handled(parser.parse(item))


def test_unknown_kind():
    with pytest.raises(ConfigError):
        webhook_parser("twilio")
