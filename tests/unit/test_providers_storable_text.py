"""Webhook parsers return only text both databases can store (issue 12).

A NUL fails an INSERT on PostgreSQL and a lone surrogate fails it on SQLite;
every text field a parser returns is cleaned, whatever field it came from.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from daemon.providers.base import IgnoredEvent
from daemon.providers.base import InboundMessage
from daemon.providers.base import StatusUpdate
from daemon.providers.base import storable_text
from daemon.providers.meta import MetaWebhookParser
from daemon.providers.wassenger import WassengerWebhookParser

# As providers send them: \u escapes in JSON text.
POISON = json.loads('"a\\u0000b\\ud800c\\udfffd"')


def storable(value) -> bool:
    if not isinstance(value, str):
        return True
    return "\x00" not in value and value.encode("utf-8") is not None


def all_storable(event) -> bool:
    return all(storable(getattr(event, f.name)) for f in dataclasses.fields(event))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain", "plain"),
        ("a\x00b", "ab"),
        ("\ud800", "\ufffd"),
        ("x\udc00\ud83d\ude00", "x\ufffd\ufffd\ufffd"),  # unpaired in a str
        ("emoji \U0001f600 ok", "emoji \U0001f600 ok"),
        (POISON, "ab\ufffdc\ufffdd"),
    ],
)
def test_storable_text(raw, clean):
    assert storable_text(raw) == clean
    storable_text(raw).encode("utf-8")  # would raise on a lone surrogate


def test_wassenger_reply_and_status_are_cleaned():
    parser = WassengerWebhookParser()
    reply = parser.parse(
        {
            "event": "message:in:new",
            "id": POISON,
            "data": {"id": POISON, "fromNumber": "+33612345678", "body": POISON},
        }
    )
    assert isinstance(reply, InboundMessage)
    assert reply.body == "ab\ufffdc\ufffdd"
    assert reply.provider_message_id == "ab\ufffdc\ufffdd"
    failed = parser.parse(
        {
            "event": "message:out:failed",
            "data": {"id": POISON, "reference": POISON, "error": POISON},
        }
    )
    assert isinstance(failed, StatusUpdate)
    assert failed.error == failed.reference == "ab\ufffdc\ufffdd"
    assert all_storable(failed) and all_storable(reply)
    ignored = parser.parse({"event": POISON, "data": {"x": 1}})
    assert isinstance(ignored, IgnoredEvent) and all_storable(ignored)


def test_meta_reply_and_status_are_cleaned():
    parser = MetaWebhookParser()
    reply = parser.parse(
        {
            "message": {
                "from": "33612345678",
                "id": POISON,
                "text": {"body": POISON},
            }
        }
    )
    assert isinstance(reply, InboundMessage)
    assert reply.body == reply.provider_message_id == "ab\ufffdc\ufffdd"
    failed = parser.parse(
        {
            "status": {
                "id": POISON,
                "status": "failed",
                "biz_opaque_callback_data": POISON,
                "errors": [{"code": POISON, "message": POISON}],
            }
        }
    )
    assert isinstance(failed, StatusUpdate)
    assert failed.error == failed.reference == failed.wa_id == "ab\ufffdc\ufffdd"
    assert failed.error_code == "ab\ufffdc\ufffdd"
    assert all_storable(failed) and all_storable(reply)
