"""What a webhook event's row holds: its dedupe key and event type, as both
databases store them and as a redelivery finds them again."""

from __future__ import annotations

import json

import pytest

from daemon.roles.web.webhooks import event_type_of
from daemon.roles.web.webhooks import storable_key

pytestmark = pytest.mark.timeout(30)

# As providers send them: \\u escapes in JSON text.
NUL_AND_SURROGATE = json.loads('"msg:\\u0000a\\ud800b"')


def test_a_plain_key_is_kept_as_it_is():
    assert storable_key("message:in:new:3EB0ABC:") == "message:in:new:3EB0ABC:"


def test_a_nul_is_dropped_and_a_lone_surrogate_replaced():
    key = storable_key(NUL_AND_SURROGATE)
    assert key == "msg:a\ufffdb"
    key.encode("utf-8")  # what SQLite needs; PostgreSQL needs no NUL
    assert storable_key(NUL_AND_SURROGATE) == key  # a redelivery finds it


def test_non_ascii_text_is_kept():
    assert storable_key("message:in:new:héllo-😀:") == "message:in:new:héllo-😀:"


def test_a_long_key_fits_the_column_and_keeps_what_tells_it_apart():
    first = storable_key("x" * 400 + "A")
    second = storable_key("x" * 400 + "B")
    assert len(first) == len(second) == 300
    assert first != second
    assert storable_key("x" * 400 + "A") == first


@pytest.mark.parametrize(
    "provider, item, expected",
    [
        ("wassenger", {"event": "message:in:new"}, "message:in:new"),
        ("wassenger", {"event": " "}, "unknown"),
        ("wassenger", {}, "unknown"),
        ("meta", {"message": {"id": "wamid.1"}}, "message"),
        ("meta", {"status": {"status": "read"}}, "status:read"),
        ("meta", {"status": {}}, "status:unknown"),
        ("meta", {"errors": []}, "errors"),
        ("meta", {"field": "account_update"}, "account_update"),
        ("meta", {}, "unknown"),
    ],
)
def test_event_type(provider, item, expected):
    assert event_type_of(provider, item) == expected
