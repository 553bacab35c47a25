"""The E.164 fast path of normalize_phone agrees with the full parser.

`phones._fast_e164` skips phonenumbers.parse for "+digits" strings; for any
input, normalize_phone must return the same number, or reject with the same
message, as when every number goes through the parser.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from daemon.domain.contacts import phones
from daemon.errors import InputError

COUNTRY_CODES = sorted(str(code) for code in COUNTRY_CODE_TO_REGION_CODE)
REGIONS = ["FR", "BE", "US", "IT", "DE", "AR", "MX", "BR", "GB"]
PROPERTY = settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def outcome(text: str, region: str, *, fast: bool) -> str:
    original = phones._fast_e164
    if not fast:
        phones._fast_e164 = lambda _text: None
    try:
        return phones.normalize_phone(text, region)
    except InputError as exc:
        return f"error: {exc}"
    finally:
        phones._fast_e164 = original


def grouped(digits: str, cuts: list[int], separator: str) -> str:
    parts, start = [], 0
    for cut in sorted(set(cuts)):
        parts.append(digits[start:cut])
        start = cut
    parts.append(digits[start:])
    return separator.join(p for p in parts if p)


international = st.builds(
    lambda cc, rest, cuts, sep: "+" + grouped(cc + rest, cuts, sep),
    st.sampled_from(COUNTRY_CODES),
    st.text("0123456789", min_size=0, max_size=14),
    st.lists(st.integers(1, 16), max_size=4),
    st.sampled_from(["", " ", ".", "-"]),
)
anything_like = st.text("+0123456789 .-()", min_size=1, max_size=20)


@PROPERTY
@given(text=st.one_of(international, anything_like), region=st.sampled_from(REGIONS))
def test_fast_path_accepts_and_rejects_like_the_parser(text, region):
    assert outcome(text, region, fast=True) == outcome(text, region, fast=False)


@PROPERTY
@given(text=international)
def test_what_the_fast_path_accepts_the_parser_accepts_as_is(text):
    fast = phones._fast_e164(text)
    if fast is not None:
        assert outcome(text, "FR", fast=False) == fast


@pytest.mark.parametrize(
    "text",
    [
        "+33612345678",  # France, mobile
        "+33 6 12 34 56 78",
        "+32 470 12 34 56",  # Belgium
        "+1 650-253-0000",  # United States
        "+44 7911 123456",  # United Kingdom
        "+4915123456789",  # Germany
    ],
)
def test_usual_international_numbers_take_the_fast_path(text):
    fast = phones._fast_e164(text)
    assert fast is not None
    assert fast == outcome(text, "FR", fast=False)


@pytest.mark.parametrize(
    "text",
    [
        "+330612345678",  # a national prefix after the country code
        "+39 06 1234 5678",  # Italy: the leading zero is part of the number
        "+3361234567",  # too short: the parser gives the reason
        "0612345678",  # national
        "+33 6 12 34 56 78 x12",  # an extension
    ],
)
def test_unusual_numbers_go_to_the_parser(text):
    assert phones._fast_e164(text) is None
