"""The request body's JSON: orjson's fast reading gives what the standard
library gives, and where they could differ the standard library decides.

parse_json is what every webhook and admin request goes through; a 400 names
what is wrong, and an accepted body means the same whichever parser read it.
"""

from __future__ import annotations

import json
import math

import falcon
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from daemon.roles.web import parse_json

pytestmark = pytest.mark.timeout(120)


def standard(raw: bytes):
    """json's reading (as before orjson), or 'refused'."""

    def no_constant(name):
        raise ValueError(name)

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError):
        return "refused"


def ours(raw: bytes):
    try:
        return parse_json(raw, strict_text=False)
    except falcon.HTTPBadRequest:
        return "refused"


def same(a, b) -> bool:
    """Equal, with types: 1 and 1.0 (or True) are different readings."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


EDGES = [
    b'{"a": 123456789012345678901234567890}',  # orjson: a float
    b'{"a": 18446744073709551616}',  # 2**64
    b'{"a": -9223372036854775809}',  # below int64
    b'{"a": 9223372036854775807, "b": -123456789012345678}',
    b'{"a": 0.1234567890123456789}',
    b'{"a": 1e400}',  # json: inf
    b'{"a": 1e-400}',
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": "\\ud800"}',  # a lone surrogate escape
    b'{"a": "\\ud83d\\ude00"}',
    b'{"a": "\xed\xa0\x80"}',  # a surrogate in UTF-8: invalid
    b'{"a": "\xff"}',
    b"\xef\xbb\xbf{}",  # a BOM
    b'{"a": "\x01"}',  # a raw control character
    b'{"a": "\x7f"}',
    b'{"a": 1, "a": 2}',
    b'{"a": -0.0, "b": -0}',
    b' \t\r\n{"a": [1, 2.5, true, false, null]} \n',
    b'{"a": 1}{"b": 2}',
    b"{'a': 1}",
    b'{"a": 01}',
    b'{"a": 1.}',
    b"[1,]",
    b"",
    b"   ",
    b"null",
    b'"text"',
    b"[" * 2000 + b"]" * 2000,
    b'{"\\u0000": "\\u0000"}',
]


@pytest.mark.parametrize("raw", EDGES, ids=range(len(EDGES)))
def test_each_edge_reads_as_the_standard_library_reads_it(raw):
    assert same(ours(raw), standard(raw)), (ours(raw), standard(raw))


def test_a_refused_body_says_why():
    with pytest.raises(falcon.HTTPBadRequest) as caught:
        parse_json(b'{"a": NaN}', strict_text=False)
    assert "NaN" in caught.value.description
    with pytest.raises(falcon.HTTPBadRequest) as caught:
        parse_json(b'{"a": "\xff"}', strict_text=False)
    assert caught.value.title == "Invalid UTF-8"


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_any_json_reads_as_the_standard_library_reads_it(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert same(ours(raw), standard(raw))
