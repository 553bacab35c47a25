"""Phone numbers to E.164: a fast path for "+digits", phonenumbers for the
rest, a reason for every refusal."""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import NumberParseException
from phonenumbers import PhoneMetadata
from phonenumbers import ValidationResult
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE
from phonenumbers.phonenumberutil import _maybe_strip_national_prefix_carrier_code
from phonenumbers.phonenumberutil import _test_number_length

from daemon.errors import InputError

_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}
_LENGTH_REASONS = {
    ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    ValidationResult.TOO_SHORT: "too short",
    ValidationResult.TOO_LONG: "too long",
    ValidationResult.INVALID_LENGTH: "wrong length",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "too short (local number only)",
}


def normalize_phone(raw: str, region: str = "FR") -> str:
    """E.164 ("+33612345678") from any usual way of writing a number."""
    region = check_region(region)
    text = (raw or "").strip()
    if not text:
        raise InputError("missing phone number")
    fast = _fast_e164(text)
    if fast is None and text[0] != "+":
        fast = _fast_national(text, region)
    if fast is not None:
        return fast
    if any(ch.isalpha() for ch in text):
        raise InputError(f"invalid phone number {text!r}: contains letters")
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        reason = _PARSE_REASONS.get(exc.error_type, "not a phone number")
        raise InputError(f"invalid phone number {text!r}: {reason}") from None
    if number.extension:
        raise InputError(f"invalid phone number {text!r}: has an extension")
    if not phonenumbers.is_valid_number(number):
        raise InputError(f"invalid phone number {text!r}: {_invalid_reason(number)}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# "+" then digits, with spaces, dots or dashes between them: the E.164 that
# most files hold (written compactly or grouped).
_E164_LIKE = re.compile(r"\+[1-9][0-9]{1,14}")
_SEPARATORS = str.maketrans("", "", " .-")


def _fast_e164(text: str) -> str | None:
    """The number of an international "+..." string, or None: ask the parser.

    phonenumbers.parse costs two thirds of a number's time, mostly in regular
    expressions a "+digits" string does not need. Here the country code is
    read off the digits and the number built directly; it still goes through
    is_valid_number, so what it accepts is what the parser accepts. Anything
    unusual (no such country code, a national number that starts with 0 or
    with what the country's national prefix may look like, an invalid
    number, which needs the parser's reason) returns None and takes the full
    parser.
    """
    compact = text.translate(_SEPARATORS)
    if not _E164_LIKE.fullmatch(compact):
        return None
    digits = compact[1:]
    for size in (1, 2, 3):
        country_code = int(digits[:size])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[size:]
    if len(national) < 2 or national[0] == "0":
        return None  # Italian-style leading zeros, national prefixes
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix and _prefix_pattern(prefix).match(national):
        return None  # the parser might strip a national prefix from it
    number = phonenumbers.PhoneNumber(
        country_code=country_code, national_number=int(national)
    )
    if not phonenumbers.is_valid_number(number):
        return None
    return "+" + digits


# Digits only once the separators are gone (3 or more: parse() finds any
# such string viable): a national number ("06 12 34 56 78") or one with the
# region's international prefix ("0033 6 12 34 56 78").
_DIGITS = re.compile(r"[0-9]{3,17}")
# What parse() does not strip off a national number when what remains has
# one of these lengths (it could be a short number).
_KEEP_PREFIX = (
    ValidationResult.TOO_SHORT,
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    ValidationResult.INVALID_LENGTH,
)


def _fast_national(text: str, region: str) -> str | None:
    """_fast_e164 for numbers written without "+", or None: ask the parser.

    Half the numbers of a French file are national ("06 12 34 56 78") or
    start with the international prefix ("0033..."), and parse() spends most
    of their time on what digits and separators do not need (extensions,
    letters, punctuation). This runs the steps of parse() that apply to
    them, with its own helpers, in its order: the region's international
    prefix (then the rest is an E.164 number: _fast_e164), the country code
    written without "+" (left to the parser), the national prefix, stripped
    as parse() strips it. A number with a leading zero left (Italy), or not
    valid, goes to the parser, which gives the reason.
    """
    compact = text.translate(_SEPARATORS)
    if not _DIGITS.fullmatch(compact):
        return None
    metadata = PhoneMetadata.metadata_for_region(region)
    if metadata is None:
        return None
    if metadata.international_prefix:
        idd = _prefix_pattern(metadata.international_prefix).match(compact)
        if idd:
            rest = compact[idd.end() :]
            # parse() keeps an international prefix followed by 0 (no country
            # code starts with 0) as part of a national number.
            return _fast_e164("+" + rest) if rest[:1] not in ("", "0") else None
    country_code = metadata.country_code
    if compact.startswith(str(country_code)):
        return None  # parse() may read the country code off the front
    _, national, _ = _maybe_strip_national_prefix_carrier_code(compact, metadata)
    if _test_number_length(national, metadata) in _KEEP_PREFIX:
        national = compact
    if national[0] == "0" or len(national) < 2:
        return None  # Italian-style leading zeros; too short
    number = phonenumbers.PhoneNumber(
        country_code=country_code, national_number=int(national)
    )
    if not phonenumbers.is_valid_number(number):
        return None
    return f"+{country_code}{national}"


@functools.lru_cache(maxsize=512)
def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(prefix)


def _invalid_reason(number: phonenumbers.PhoneNumber) -> str:
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible != ValidationResult.IS_POSSIBLE:
        return _LENGTH_REASONS.get(possible, "impossible number")
    where = phonenumbers.region_code_for_number(number) or "its country code"
    return f"not a valid {where} number"


def check_region(region: str) -> str:
    """The upper-cased ISO region code, if phonenumbers knows it."""
    code = (region or "").strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise InputError(f"unknown region {region!r} (expected e.g. FR, BE, US)")
    return code
