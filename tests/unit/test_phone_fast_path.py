"""The fast paths of normalize_phone agree with the full parser.

`phones._fast_e164` skips phonenumbers.parse for "+digits" strings,
`phones._fast_national` for digits written without "+" (national, or after
the region's international prefix); for any input, normalize_phone must
return the same number, or reject with the same message, as when every
number goes through the parser.
"""

from __future__ import annotations

import phonenumbers
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
    original = phones._fast_e164, phones._fast_national
    if not fast:
        phones._fast_e164 = lambda _text: None
        phones._fast_national = lambda _text, _region: None
    try:
        return phones.normalize_phone(text, region)
    except InputError as exc:
        return f"error: {exc}"
    finally:
        phones._fast_e164, phones._fast_national = original


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
ALL_REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
TYPES = [
    phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.FIXED_LINE,
    phonenumbers.PhoneNumberType.TOLL_FREE,
    phonenumbers.PhoneNumberType.VOIP,
]


def example(region: str, kind) -> phonenumbers.PhoneNumber | None:
    return phonenumbers.example_number_for_type(region, kind)


# Real numbers of every region as people write them: nationally, and from
# another region with its international prefix; the digits then changed a
# little (a digit replaced, added or dropped) to reach the edges.
written = st.builds(
    lambda number_region, kind, dialled_from, style: (
        (
            phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
            if style == "national"
            else phonenumbers.format_out_of_country_calling_number(number, dialled_from)
        )
        if (number := example(number_region, kind)) is not None
        else "0"
    ),
    st.sampled_from(ALL_REGIONS),
    st.sampled_from(TYPES),
    st.sampled_from(ALL_REGIONS),
    st.sampled_from(["national", "international"]),
)


@st.composite
def mutated(draw, base):
    text = draw(base)
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    if not digits:
        return text
    at = draw(st.sampled_from(digits))
    change = draw(st.sampled_from(["same", "replace", "add", "drop"]))
    new = draw(st.sampled_from("0123456789"))
    if change == "replace":
        return text[:at] + new + text[at + 1 :]
    if change == "add":
        return text[:at] + new + text[at:]
    if change == "drop":
        return text[:at] + text[at + 1 :]
    return text


# Digits with a region's prefixes in front: national prefix, international
# prefix, country code without "+".
prefixed = st.builds(
    lambda prefix, rest, cuts, sep: grouped(prefix + rest, cuts, sep),
    st.sampled_from(["0", "00", "011", "1", "8", "33", "0033", "00330", "0390"]),
    st.text("0123456789", min_size=0, max_size=14),
    st.lists(st.integers(1, 16), max_size=4),
    st.sampled_from(["", " ", ".", "-"]),
)


@PROPERTY
@given(text=st.one_of(international, anything_like), region=st.sampled_from(REGIONS))
def test_fast_path_accepts_and_rejects_like_the_parser(text, region):
    assert outcome(text, region, fast=True) == outcome(text, region, fast=False)


@PROPERTY
@given(
    text=st.one_of(mutated(written), prefixed),
    region=st.sampled_from(REGIONS + ALL_REGIONS),
)
def test_national_fast_path_accepts_and_rejects_like_the_parser(text, region):
    assert outcome(text, region, fast=True) == outcome(text, region, fast=False)


@pytest.mark.parametrize("region", ALL_REGIONS)
def test_every_region_s_examples_read_the_same(region):
    for number_region in ("FR", "US", "DE", "IT", "BR", region):
        for kind in TYPES:
            number = example(number_region, kind)
            if number is None:
                continue
            for text in (
                phonenumbers.format_number(
                    number, phonenumbers.PhoneNumberFormat.NATIONAL
                ),
                phonenumbers.format_out_of_country_calling_number(number, region),
            ):
                text = text.replace("(", "").replace(")", "")
                expected = outcome(text, region, fast=False)
                assert outcome(text, region, fast=True) == expected, text


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
    ("text", "region"),
    [
        ("06 12 34 56 78", "FR"),
        ("0612345678", "FR"),
        ("0033 6 12 34 56 78", "FR"),
        ("0470 12 34 56", "BE"),
        ("0032470123456", "BE"),
        ("0151 23456789", "DE"),
        ("07911 123456", "GB"),
        ("650 253-0000", "US"),
    ],
)
def test_usual_national_numbers_take_the_fast_path(text, region):
    fast = phones._fast_national(text, region)
    assert fast is not None
    assert fast == outcome(text, region, fast=False)


@pytest.mark.parametrize(
    ("text", "region"),
    [
        ("06 1234 5678", "IT"),  # the leading zero is part of the number
        ("33612345678", "FR"),  # the country code without "+"
        ("0612345", "FR"),  # too short: the parser gives the reason
        ("00 0612345678", "FR"),  # not an international prefix
        ("06 12 34 56 78 x12", "FR"),  # an extension
        ("06/12/34/56/78", "FR"),  # other punctuation
    ],
)
def test_unusual_national_numbers_go_to_the_parser(text, region):
    assert phones._fast_national(text, region) is None


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


def library_valid(country_code: int, national: str) -> bool:
    number = phonenumbers.PhoneNumber(
        country_code=country_code, national_number=int(national)
    )
    return phonenumbers.is_valid_number(number)


@PROPERTY
@given(
    country_code=st.sampled_from(COUNTRY_CODES),
    national=st.text("0123456789", min_size=1, max_size=15).filter(
        lambda s: s[0] != "0"
    ),
)
def test_validity_is_the_library_s(country_code, national):
    country_code = int(country_code)
    assert phones._is_valid(country_code, national) == library_valid(
        country_code, national
    )


@pytest.mark.parametrize("region", ALL_REGIONS)
def test_validity_of_every_region_s_examples_is_the_library_s(region):
    for kind in [*TYPES, phonenumbers.PhoneNumberType.PREMIUM_RATE]:
        number = example(region, kind)
        if number is None:
            continue
        national = str(number.national_number)
        for digit in "0123456789":
            for text in (national[:-1] + digit, national + digit, national[:-1]):
                if text and text[0] != "0":
                    expected = library_valid(number.country_code, text)
                    assert phones._is_valid(number.country_code, text) == expected
