"""Hypothesis strategies for fuzzing a JSON-over-HTTP API: valid-ish request bodies, then their bytes, valid or not.

A body is described by a :class:`BodySpec` (each field's strategy of good values, and which fields are required).
:func:`bodies` draws a valid body and then mutates it a few times: a field replaced by junk (wrong types,
out-of-range and non-finite numbers, huge strings, nested lists and objects), set to null or dropped, an unknown
field added; now and then the body is not an object at all. Most bodies differ from a valid one in a place or two,
so they get past the first checks and reach the code behind them. :func:`encoded` turns a body into bytes: JSON
as is (with NaN and lone surrogates, which Python's parser accepts), cut short, with invalid UTF-8 inserted, random
bytes or nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.support.proto_strategies import INVALID_UTF8

EDGE_INTS = (-1, 0, 1, 2, 3, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30)
EDGE_FLOATS = (0.0, -0.0, -1.0, 0.5, 1.0, 2.5, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"))
_HUGE_CHARS = ("a", " ", "\u20ac", "\U0001f600", "\x00", "\ud800")  # the last a lone surrogate


def huge_strings(sizes: Sequence[int]) -> st.SearchStrategy[str]:
    """One character repeated: a size just under a limit reaches the check behind it, one over hits the limit."""
    return st.builds(lambda char, count: char * count, st.sampled_from(_HUGE_CHARS), st.sampled_from(sizes))


def junk(interesting: Sequence[str], huge_sizes: Sequence[int]) -> st.SearchStrategy[Any]:
    """Any JSON value (a Python float may be NaN or infinite), nested a few levels, with ``interesting`` strings."""
    keys = st.text(max_size=8) | st.sampled_from(interesting)
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(EDGE_INTS),
        st.floats(),
        st.sampled_from(EDGE_FLOATS),
        st.text(max_size=16),
        st.sampled_from(interesting),
        huge_strings(huge_sizes),
    )
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12
    )


@dataclass(frozen=True)
class BodySpec:
    fields: Mapping[str, st.SearchStrategy[Any]]  # each field's good values
    required: frozenset[str] = frozenset()


_MUTATIONS = ("junk", "junk", "junk", "null", "drop", "unknown")


@st.composite
def bodies(draw: st.DrawFn, spec: BodySpec, junk_values: st.SearchStrategy[Any]) -> Any:
    """A body of ``spec``: the required fields and about a fifth of the others, then 0-4 mutations."""
    body: dict[str, Any] = {
        name: draw(good) for name, good in spec.fields.items() if name in spec.required or draw(st.integers(0, 4)) == 0
    }
    names = sorted(spec.fields)
    for _ in range(draw(st.sampled_from((0, 0, 0, 1, 1, 2, 4)))):
        mutation, name = draw(st.sampled_from(_MUTATIONS)), draw(st.sampled_from(names))
        if mutation == "junk":
            body[name] = draw(junk_values)
        elif mutation == "null":
            body[name] = None
        elif mutation == "drop":
            body.pop(name, None)
        else:
            body[draw(st.text(min_size=1, max_size=12))] = draw(junk_values)
    if draw(st.integers(0, 39)) == 0:
        return draw(junk_values)  # not an object at all
    return body


_ENCODINGS = (*["json"] * 7, "ascii", "cut", "invalid-utf8", "bytes", "empty")


@st.composite
def encoded(draw: st.DrawFn, value: Any) -> bytes:
    """``value`` as request bytes: JSON (UTF-8, lone surrogates passed through, or ASCII with escapes), cut
    short, with an invalid UTF-8 sequence inserted, random bytes, or empty."""
    encoding = draw(st.sampled_from(_ENCODINGS))
    if encoding == "ascii":
        return json.dumps(value).encode()
    data = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if encoding == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if encoding == "invalid-utf8":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from(INVALID_UTF8)) + data[at:]
    if encoding == "bytes":
        return draw(st.binary(max_size=64))
    if encoding == "empty":
        return b""
    return data
