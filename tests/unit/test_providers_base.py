"""Pure helpers of daemon.providers.base: signatures, Retry-After, coercions."""

from __future__ import annotations

import hashlib
import hmac
import pickle

import pytest

from daemon.errors import DaemonError
from daemon.providers.base import PauseCampaignError
from daemon.providers.base import PermanentError
from daemon.providers.base import RecipientOptedOutError
from daemon.providers.base import RetryableError
from daemon.providers.base import as_e164
from daemon.providers.base import as_epoch
from daemon.providers.base import as_text
from daemon.providers.base import error_text
from daemon.providers.base import parse_retry_after
from daemon.providers.base import sign_hmac_sha256
from daemon.providers.base import unknown_key
from daemon.providers.base import verify_hmac_sha256

pytestmark = pytest.mark.timeout(30)

BODY = b'{"object":"whatsapp_business_account","entry":[]}'


def _sig(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_hmac_accepts_the_exact_body_signature():
    assert verify_hmac_sha256("s3cret", BODY, _sig("s3cret", BODY))
    assert verify_hmac_sha256("s3cret", BODY, sign_hmac_sha256("s3cret", BODY))


def test_hmac_accepts_uppercase_hex_and_spaces():
    header = "sha256=" + _sig("s3cret", BODY).split("=", 1)[1].upper()
    assert verify_hmac_sha256("s3cret", BODY, f"  {header} ")


@pytest.mark.parametrize(
    "secret, body, header",
    [
        ("s3cret", BODY + b" ", _sig("s3cret", BODY)),  # re-serialised body
        ("other", BODY, _sig("s3cret", BODY)),
        ("s3cret", BODY, None),
        ("s3cret", BODY, ""),
        ("s3cret", BODY, "sha1=" + _sig("s3cret", BODY).split("=", 1)[1]),
        ("s3cret", BODY, _sig("s3cret", BODY).split("=", 1)[1]),  # no scheme
        ("", BODY, _sig("", BODY)),  # no secret configured: never valid
        ("s3cret", BODY, "sha256=zz"),
    ],
)
def test_hmac_rejects(secret, body, header):
    assert not verify_hmac_sha256(secret, body, header)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("120", 120.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),  # now = 07:27:30
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past
    ],
)
def test_parse_retry_after(value, expected):
    now = 1445412450.0  # Wed, 21 Oct 2015 07:27:30 GMT
    assert parse_retry_after(value, now=now) == expected


def test_errors_hang_from_daemon_error_and_keep_attributes():
    err = RetryableError("HTTP 429: slow down", http_status=429, code=7, retry_after=3)
    assert isinstance(err, DaemonError)
    assert (err.reason, err.http_status, err.code, err.retry_after) == (
        "HTTP 429: slow down",
        429,
        7,
        3,
    )
    assert str(err) == "HTTP 429: slow down"
    assert issubclass(RecipientOptedOutError, PermanentError)
    assert issubclass(PauseCampaignError, PermanentError)
    # Task queues may pickle exceptions: attributes must survive.
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.retry_after, back.http_status) == (err.reason, 3, 429)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("+33 6 12 34 56 78", "+33612345678"),
        ("33612345678", "+33612345678"),
        (33612345678, "+33612345678"),
        ("5215617354008@c.us", "+5215617354008"),
        ("", None),
        ("abc", None),
        (None, None),
        (True, None),
        ({"phone": "+336"}, None),
    ],
)
def test_as_e164(value, expected):
    assert as_e164(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("message:in:new", "message:in:new"),
        ("  3EB0 \n", "3EB0"),
        ("", None),
        ("   ", None),
        (7, "7"),
        (2.5, "2.5"),
        (True, None),
        (None, None),
        ({"id": "x"}, None),
        (["x"], None),
    ],
)
def test_as_text(value, expected):
    assert as_text(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (1765642500, 1765642500.0),
        ("1749416383", 1749416383.0),
        (1765642500123, 1765642500.123),  # milliseconds
        ("2025-12-13T16:15:00.000Z", 1765642500.0),
        ("2025-12-13T16:15:00", 1765642500.0),
        ("yesterday", None),
        (-5, None),
        (None, None),
        (False, None),
        ([1], None),
    ],
)
def test_as_epoch(value, expected):
    result = as_epoch(value)
    assert result == pytest.approx(expected) if expected is not None else result is None


def test_error_text_shapes():
    assert error_text("boom") == ("boom", None)
    assert error_text({"message": "bad", "code": 131026}) == ("bad", 131026)
    assert error_text(
        {"code": 131026, "title": "Undeliverable", "error_data": {"details": "gone"}}
    ) == ("Undeliverable: gone", 131026)
    assert error_text(None) == (None, None)
    assert error_text({"code": [1]})[1] is None


def test_unknown_key_is_stable_and_order_free():
    assert unknown_key({"a": 1, "b": [1, 2]}) == unknown_key({"b": [1, 2], "a": 1})
    assert unknown_key({"a": 1}) != unknown_key({"a": 2})
    assert unknown_key({"a": 1}).startswith("unknown:")
