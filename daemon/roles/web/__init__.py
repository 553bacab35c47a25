"""The web role: webhooks, admin API, health and metrics on one Falcon app.

This module holds the request helpers every resource shares: reading a JSON
body defensively (a client's mistake is always a 4xx, never a 5xx) and the
error responses.
"""

from __future__ import annotations

import json
from typing import Any

import falcon
import orjson

# Real webhook payloads nest about 7 levels (Meta's entry/changes/value/...);
# anything much deeper is garbage or an attack on the parsers behind us.
MAX_JSON_DEPTH = 32


def bad_request(title: str, description: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title=title, description=description)


def read_body(req: falcon.Request) -> bytes:
    """The raw request body (already size-limited by the BodyLimit middleware)."""
    return req.bounded_stream.read()


def parse_json(raw: bytes, *, strict_text: bool = True) -> Any:
    """Decode a JSON body or raise a 400 that says what is wrong with it.

    `strict_text` also rejects strings the database cannot store (NUL, lone
    surrogates): right for the admin API. Webhook payloads are kept as they
    come (a whole body stored as received, a part of one ASCII-escaped) so a
    provider is never refused.
    """
    value = _parsed_fast(raw)
    if value is _REFUSED:
        value = _parsed_exactly(raw)
    # A body with no more brackets than MAX_JSON_DEPTH cannot nest deeper
    # (counted in C; brackets inside strings only make the bound looser), so
    # only text checks need the walk: it was a third of a webhook's Python.
    if strict_text or raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH:
        check_shape(value, strict_text=strict_text)
    return value


_REFUSED = object()
# Every byte to b"1" if it is a digit, else b"0": a run of 19 ones marks a
# number of 19 digits or more (one that may not fit 64 bits).
_DIGIT_MAP = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_LONG_NUMBER = b"1" * 19


def _parsed_fast(raw: bytes) -> Any:
    """orjson's reading of `raw`, or _REFUSED where it may differ from the
    standard library's: orjson turns integers beyond 64 bits into floats (so
    a body with a run of 19 digits anywhere is left to json), and refuses
    what json accepts (NaN, 1e400, lone surrogate escapes) or refuses with
    its own words. Where it accepts, the values are json's, in a third of
    the time for a 1.5 KB webhook body (W2, docs/benchmarks.md)."""
    if _LONG_NUMBER in raw.translate(_DIGIT_MAP):
        return _REFUSED
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _REFUSED


def _parsed_exactly(raw: bytes) -> Any:
    """The standard library's reading of `raw`, or a 400 that says what is
    wrong with it."""
    if not raw.strip():
        raise bad_request("Empty body", "expected a JSON document, got no body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            "Invalid UTF-8", f"the body is not valid UTF-8 (byte {exc.start})"
        ) from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, huge integers, NaN
        raise bad_request("Invalid JSON", f"could not parse the body: {exc}") from None
    return value


def parse_json_object(raw: bytes, *, strict_text: bool = True) -> dict:
    value = parse_json(raw, strict_text=strict_text)
    if not isinstance(value, dict):
        raise bad_request(
            "Invalid body", f"expected a JSON object, got {json_kind(value)}"
        )
    return value


def check_shape(value: Any, *, strict_text: bool) -> None:
    """Reject JSON nested deeper than MAX_JSON_DEPTH (and bad text if strict)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            for key, child in item.items():
                if strict_text:
                    check_text(key, "object key")
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            stack.extend((child, depth + 1) for child in item)
        elif strict_text and isinstance(item, str):
            check_text(item, "string")


def check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise bad_request("Invalid text", f"a {what} contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(
                "Invalid text", f"a {what} contains an unpaired surrogate escape"
            ) from None


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every request, as json.loads keeps one: json.loads with an
# argument builds a decoder a call. Shared safely: a decode holds the GIL.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _too_deep() -> falcon.HTTPBadRequest:
    return bad_request(
        "Invalid JSON", f"the body is nested deeper than {MAX_JSON_DEPTH} levels"
    )
