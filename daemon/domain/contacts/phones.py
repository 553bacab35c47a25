"""Phone numbers to E.164: a fast path for "+digits", phonenumbers for the
rest, a reason for every refusal."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import phonenumbers
from phonenumbers import NumberParseException
from phonenumbers import PhoneMetadata
from phonenumbers import ValidationResult
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE
from phonenumbers.phonenumberutil import REGION_CODE_FOR_NON_GEO_ENTITY
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
    if not _is_valid(country_code, national):
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
    if not _is_valid(country_code, national):
        return None
    return f"+{country_code}{national}"


def _is_valid(country_code: int, national: str) -> bool:
    """phonenumbers.is_valid_number for a national number without leading
    zeros: the same tests of the same metadata, in the same order, with the
    patterns compiled once (is_valid_number looks each one up in the re
    module's cache, half of its time, which is half of a number's)."""
    descs = _number_descs(country_code)
    if descs is None:
        number = phonenumbers.PhoneNumber(
            country_code=country_code, national_number=int(national)
        )
        return phonenumbers.is_valid_number(number)
    general, types, fixed_line, mobile, same_pattern = descs
    # _number_type_helper(...) != UNKNOWN, spelled out.
    if not _matches(national, general):
        return False
    if any(_matches(national, desc) for desc in types):
        return True
    if _matches(national, fixed_line):
        return True
    return not same_pattern and _matches(national, mobile)


_Desc = tuple[frozenset[int], Callable[[str], "re.Match | None"]] | None


@functools.cache
def _number_descs(country_code: int) -> tuple | None:
    """The metadata is_valid_number tests a number of this country code
    against, or None when the code has several regions (it picks one from
    the number first: left to it)."""
    regions = COUNTRY_CODE_TO_REGION_CODE.get(country_code, ())
    if len(regions) != 1:
        return None
    region = regions[0]
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None:
        return None
    if region != REGION_CODE_FOR_NON_GEO_ENTITY:
        if phonenumbers.country_code_for_valid_region(region) != country_code:
            return None
    types = (
        metadata.premium_rate,
        metadata.toll_free,
        metadata.shared_cost,
        metadata.voip,
        metadata.personal_number,
        metadata.pager,
        metadata.uan,
        metadata.voicemail,
    )
    return (
        _desc(metadata.general_desc),
        tuple(_desc(desc) for desc in types),
        _desc(metadata.fixed_line),
        _desc(metadata.mobile),
        bool(metadata.same_mobile_and_fixed_line_pattern),
    )


def _desc(desc) -> _Desc:
    if desc is None or not desc.national_number_pattern:
        return None  # matches nothing, as in _is_number_matching_desc
    lengths = frozenset(desc.possible_length or ())
    return lengths, re.compile(desc.national_number_pattern).fullmatch


def _matches(national: str, desc: _Desc) -> bool:
    # _is_number_matching_desc: the possible lengths (if any), then the
    # pattern over the whole number.
    if desc is None:
        return False
    lengths, fullmatch = desc
    if lengths and len(national) not in lengths:
        return False
    return fullmatch(national) is not None


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


def whatsapp_variants(phone: str) -> tuple[str, ...]:
    """The other E.164 forms under which WhatsApp may know the same line.

    WhatsApp ids (a webhook's sender) keep forms the numbering plans dropped
    or never had: Mexico's mobile "1" (wa_id 521 + 10 digits, E.164 +52 + 10
    since 2019), Argentina's mobile "9" (549... against +54... as often
    written), and Brazil's ninth digit (an account older than the ninth
    digit keeps 55 + area + 8 digits). A reply, or a STOP, from one form must
    reach the contact imported in the other. Only those three countries; ()
    for every other number.
    """
    digits = phone.removeprefix("+")
    country, national = digits[:2], digits[2:]
    if country == "52" and len(national) == 11 and national[0] == "1":
        return (f"+52{national[1:]}",)
    if country == "52" and len(national) == 10:
        return (f"+521{national}",)
    if country == "54" and len(national) == 11 and national[0] == "9":
        return (f"+54{national[1:]}",)
    if country == "54" and len(national) == 10:
        return (f"+549{national}",)
    if country == "55" and len(national) == 11 and national[2] == "9":
        return (f"+55{national[:2]}{national[3:]}",)
    if country == "55" and len(national) == 10 and national[2] in "6789":
        return (f"+55{national[:2]}9{national[2:]}",)
    return ()
