"""Sticky bucketing: a user key hashes (with the route's salt) into one of 10,000 buckets, and a table assigns each
bucket to a variant in proportion to the weights.

The table is state, not a function of the weights: when weights change, :func:`rebalance` keeps every bucket on
its variant while that variant still has room, and hands only the surplus buckets of shrinking variants to the
growing ones, so the number of users who move is the least possible (half the L1 distance of the bucket counts).
No function of the weights alone can do that for three or more variants, which is why the routes file stores the
table (as ranges per variant) beside the weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from loraplex.server.routing.errors import InvalidRoute
from loraplex.server.routing.routes import BUCKETS, Variant

# bucket -> index of its variant in the route's variant tuple
BucketTable = tuple[int, ...]


def bucket_of(salt: str, user_key: str) -> int:
    """The bucket (0..9,999) of ``user_key`` in a route salted with ``salt``: stable across processes and hosts."""
    digest = hashlib.sha256(f"{salt}\x00{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def fresh_table(variants: Sequence[Variant]) -> BucketTable:
    """Contiguous ranges in variant order, each as many buckets as its weight asks."""
    table: list[int] = []
    for index, variant in enumerate(variants):
        table += [index] * variant.buckets
    return tuple(table)


def rebalance(owners: Sequence[str | None], variants: Sequence[Variant]) -> BucketTable:
    """A table for ``variants`` that keeps each bucket's previous owner (a variant name, or None) where it can.

    A bucket stays with its owner while the owner (by name) exists and has fewer buckets than its weight asks;
    the buckets left over go, in bucket order, to the variants still short of their share, in variant order.
    """
    index_of = {variant.name: index for index, variant in enumerate(variants)}
    room = [variant.buckets for variant in variants]
    table: list[int] = [-1] * BUCKETS
    for bucket, owner in enumerate(owners):
        index = index_of.get(owner) if owner is not None else None
        if index is not None and room[index] > 0:
            table[bucket] = index
            room[index] -= 1
    short = (index for index, left in enumerate(room) for _ in range(left))
    for bucket in range(BUCKETS):
        if table[bucket] < 0:
            table[bucket] = next(short)
    return tuple(table)


def owners_of(table: BucketTable, variants: Sequence[Variant]) -> list[str | None]:
    return [variants[index].name for index in table]


def encode_ranges(table: BucketTable, variants: Sequence[Variant]) -> dict[str, str]:
    """``{variant: "0-4999,7000-7499"}``: each variant's buckets as inclusive ranges (variants without any omitted)."""
    ranges: dict[str, list[str]] = {}
    start = 0
    for bucket in range(1, BUCKETS + 1):
        if bucket == BUCKETS or table[bucket] != table[start]:
            end = bucket - 1
            text = str(start) if start == end else f"{start}-{end}"
            ranges.setdefault(variants[table[start]].name, []).append(text)
            start = bucket
    return {name: ",".join(parts) for name, parts in ranges.items()}


def decode_ranges(route: str, ranges: Mapping[str, str]) -> list[str | None]:
    """Owners per bucket from :func:`encode_ranges` text; buckets no range names are None (free)."""
    owners: list[str | None] = [None] * BUCKETS
    for name, text in ranges.items():
        for part in str(text).split(","):
            first, _, last = part.strip().partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise InvalidRoute(
                    f"route '{route}': buckets of '{name}' must be ranges like '0-4999,7000' (got {part!r})"
                ) from None
            if not 0 <= low <= high < BUCKETS:
                raise InvalidRoute(f"route '{route}': bucket range {part!r} of '{name}' is outside 0-{BUCKETS - 1}")
            for bucket in range(low, high + 1):
                if owners[bucket] is not None:
                    raise InvalidRoute(
                        f"route '{route}': bucket {bucket} belongs to both '{owners[bucket]}' and '{name}'"
                    )
                owners[bucket] = name
    return owners
