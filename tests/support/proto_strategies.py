"""Hypothesis strategies that write protobuf wire bytes for any message descriptor, valid or not.

The bytes are encoded here rather than through the generated classes, so a strategy can put what those classes
refuse to build into a request: invalid UTF-8 in a ``string`` field, out-of-range enum values, non-canonical
booleans, numbers packed and unpacked, unknown fields, huge repeated fields and truncated messages. Every field of
the descriptor (recursively, maps included) can appear; ``interesting`` strings (the names a server knows) are
mixed into the string fields so that fuzzed requests also reach the code behind the validation.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
}
INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80")
_LENGTH_TYPES = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
MAX_DEPTH = 2
HUGE_FIELD_BYTES = 1 << 20  # a huge repeated field holds thousands of values, up to about this many bytes


def varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as their 64-bit two's complement (10 bytes), as protobuf writes them."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, _LENGTH) + varint(len(payload)) + payload


def _integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_BOUNDS[field_type]
    edges = sorted({low, high, 0, 1, -1 if low < 0 else 2, high // 2 + 1, 2**31 - 1 if high > 2**31 else high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(0, 300))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[bytes]:
    """Strategies for one scalar value, encoded without its tag."""
    kind = field.type
    if kind in _INT_BOUNDS:
        if kind == FieldDescriptor.TYPE_ENUM:
            known = [value.number for value in field.enum_type.values]
            return st.one_of(st.sampled_from(known), _integers(kind)).map(varint)
        return _integers(kind).map(varint)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.one_of(st.booleans().map(int), st.sampled_from([2, 255, 2**64 - 1])).map(varint)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        edges = [float("nan"), float("inf"), -float("inf"), -0.0, 1e308, -1e308, 5e-324, 2.0**64]
        return st.one_of(st.sampled_from(edges), st.floats(), st.floats(-3, 3)).map(lambda x: struct.pack("<d", x))
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32).map(lambda x: struct.pack("<f", x))
    raise NotImplementedError(f"no strategy for field {field.full_name} of type {kind}")


def _wire_type(field: FieldDescriptor) -> int:
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return _FIXED64
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return _FIXED32
    return _VARINT


def text_bytes(interesting: Sequence[str]) -> st.SearchStrategy[bytes]:
    """UTF-8 text (known names, arbitrary text, very long text) and byte strings that are not UTF-8 at all."""
    long = st.builds(lambda s, n: s * n, st.sampled_from(["a", "é", "🦙", "\x00"]), st.integers(200, 70_000))
    valid = st.one_of(*[st.sampled_from(list(interesting))] * 4, *[st.text(max_size=12)] * 3, long).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    )
    invalid = st.builds(
        lambda head, bad, tail: head + bad + tail,
        st.binary(max_size=8),
        st.sampled_from(INVALID_UTF8),
        st.binary(max_size=8),
    )
    return st.one_of(valid, invalid)


def raw_bytes() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and runs of 4-byte-length-prefixed elements (the OIP BYTES layout), lengths honest or not."""
    element = st.builds(
        lambda data, lie: struct.pack("<I", (len(data) + lie) % 2**32) + data,
        st.binary(max_size=16),
        st.sampled_from([0, 0, 0, 1, -1, 2**31]),
    )
    return st.one_of(st.binary(max_size=64), st.lists(element, max_size=4).map(b"".join))


def _values(field: FieldDescriptor, interesting: Sequence[str], depth: int) -> st.SearchStrategy[bytes]:
    """One value of ``field`` as it appears after its tag (length-delimited payloads include their length)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_bytes(field.message_type, interesting, depth + 1).map(lambda m: varint(len(m)) + m)
    if field.type == FieldDescriptor.TYPE_STRING:
        return text_bytes(interesting).map(lambda b: varint(len(b)) + b)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return raw_bytes().map(lambda b: varint(len(b)) + b)
    return _scalar(field)


def _field(field: FieldDescriptor, interesting: Sequence[str], depth: int) -> st.SearchStrategy[bytes]:
    """Every occurrence of ``field`` in a message: one value, a few, a packed run, or thousands."""
    value = _values(field, interesting, depth)
    wire = _LENGTH if field.type in _LENGTH_TYPES else _wire_type(field)
    head = tag(field.number, wire)
    if field.label != FieldDescriptor.LABEL_REPEATED:
        return value.map(lambda v: head + v)  # a repeated occurrence of a singular field is legal: last one wins
    some = st.lists(value, max_size=3).map(lambda vs: b"".join(head + v for v in vs))
    huge = st.tuples(value, st.integers(1_000, 20_000)).map(
        lambda vn: (head + vn[0]) * min(vn[1], max(1, HUGE_FIELD_BYTES // len(head + vn[0])))
    )
    strategies = [some] * 19 + [huge]
    if wire != _LENGTH:  # packed numbers (proto3's default encoding), which parsers must accept next to unpacked ones
        strategies.append(st.lists(value, max_size=8).map(lambda vs: length_delimited(field.number, b"".join(vs))))
    return st.one_of(strategies)


def _unknown_field() -> st.SearchStrategy[bytes]:
    number = st.integers(100, 2**29 - 1)
    return st.one_of(
        st.builds(lambda n, v: tag(n, _VARINT) + varint(v), number, st.integers(0, 2**64 - 1)),
        st.builds(length_delimited, number, st.binary(max_size=16)),
        st.builds(lambda n, b: tag(n, _FIXED32) + b, number, st.binary(min_size=4, max_size=4)),
    )


def message_bytes(descriptor: Descriptor, interesting: Sequence[str], depth: int = 0) -> st.SearchStrategy[bytes]:
    """Wire bytes of a ``descriptor`` message: any subset of its fields, in order or reversed, sometimes unknown
    fields, sometimes cut short (a truncated message must be refused, not misread). Built once per message type."""
    key = (descriptor.full_name, tuple(interesting), depth)
    if key not in _MESSAGES:
        _MESSAGES[key] = _message_bytes(descriptor, tuple(interesting), depth)
    return _MESSAGES[key]


_MESSAGES: dict[tuple[str, tuple[str, ...], int], st.SearchStrategy[bytes]] = {}


def _join(parts: Sequence[bytes], reverse: bool) -> bytes:
    return b"".join(reversed(parts) if reverse else parts)


def _message_bytes(descriptor: Descriptor, interesting: tuple[str, ...], depth: int) -> st.SearchStrategy[bytes]:
    if depth >= MAX_DEPTH or not descriptor.fields:
        return st.one_of(st.just(b""), _unknown_field())
    absent = st.just(b"")
    present = [st.one_of(absent, _field(field, interesting, depth)) for field in descriptor.fields]
    parts = st.tuples(*present, st.one_of(absent, absent, absent, _unknown_field()))
    body = st.builds(_join, parts, st.booleans())
    if depth:
        return body
    cut = st.builds(lambda whole, drop: whole[: max(0, len(whole) - drop)], body, st.integers(1, 8))
    return st.one_of(body, body, body, body, body, body, body, cut)
