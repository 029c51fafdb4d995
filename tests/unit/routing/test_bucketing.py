"""Sticky bucketing: stable buckets, weights honoured (chi-square over 100k keys), the fewest users moved when
weights change, bucket ranges that round-trip, and per-request assignment without a user key."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loraplex.server.routing import abstats
from loraplex.server.routing.bucketing import (
    bucket_of,
    decode_ranges,
    encode_ranges,
    fresh_table,
    owners_of,
    rebalance,
)
from loraplex.server.routing.errors import InvalidRoute
from loraplex.server.routing.experiments import Experiments
from loraplex.server.routing.router import Router
from loraplex.server.routing.routes import BUCKETS, Variant, route_from_spec
from loraplex.server.routing.store import RouteStore

KEYS = [f"user-{i}" for i in range(100_000)]


def variants(*weights: float) -> tuple[Variant, ...]:
    return tuple(Variant(f"v{i}", f"adapter-{i}", w) for i, w in enumerate(weights))


def moved(before: tuple[int, ...], after: tuple[int, ...], old: tuple[Variant, ...], new: tuple[Variant, ...]) -> int:
    return sum(1 for a, b in zip(owners_of(before, old), owners_of(after, new), strict=True) if a != b)


def test_a_key_always_lands_in_the_same_bucket() -> None:
    assert bucket_of("support-bot", "alice") == bucket_of("support-bot", "alice")
    assert bucket_of("support-bot", "alice") == 2082  # pinned: a changed hash would move every user
    assert bucket_of("other-salt", "alice") != bucket_of("support-bot", "alice")
    assert all(0 <= bucket_of("s", key) < BUCKETS for key in KEYS[:1000])


def test_weights_are_honoured_over_100k_keys() -> None:
    chosen = variants(50, 30, 20)
    table = fresh_table(chosen)
    assert Counter(table) == {0: 5000, 1: 3000, 2: 2000}
    counts = Counter(table[bucket_of("support-bot", key)] for key in KEYS)
    observed = [counts[i] for i in range(3)]
    result = abstats.sample_ratio_test(observed, [50, 30, 20])
    assert result is not None and result.p_value > 0.001, (observed, result)
    assert all(abs(o / len(KEYS) - w / 100) < 0.01 for o, w in zip(observed, [50, 30, 20], strict=True))


def test_a_weight_change_moves_only_the_buckets_that_must_move() -> None:
    old, new = variants(34, 33, 33), variants(50, 25, 25)
    before = fresh_table(old)
    after = rebalance(owners_of(before, old), new)
    assert Counter(after) == {0: 5000, 1: 2500, 2: 2500}
    # v1 and v2 each give up 800 buckets to v0; nobody else moves.
    assert moved(before, after, old, new) == 1600
    # Contiguous ranges recomputed from the weights alone would move 2400 buckets.
    assert moved(before, fresh_table(new), old, new) == 2400
    users_moved = sum(1 for key in KEYS if before[bucket_of("r", key)] != after[bucket_of("r", key)])
    assert 0.15 < users_moved / len(KEYS) < 0.17


def test_unchanged_weights_move_nobody_and_a_new_variant_takes_only_its_share() -> None:
    old = variants(60, 40)
    before = fresh_table(old)
    assert rebalance(owners_of(before, old), old) == before
    grown = (*variants(50, 30), Variant("v2", "adapter-2", 20))
    after = rebalance(owners_of(before, old), grown)
    assert moved(before, after, old, grown) == 2000
    assert all(after[b] == before[b] for b in range(BUCKETS) if after[b] != 2)


def test_a_removed_variants_buckets_go_to_the_others() -> None:
    old = variants(50, 25, 25)
    before = fresh_table(old)
    survivors = (Variant("v0", "adapter-0", 50), Variant("v2", "adapter-2", 50))
    after = rebalance(owners_of(before, old), survivors)
    assert Counter(after) == {0: 5000, 1: 5000}
    assert moved(before, after, old, survivors) == 2500


def test_ranges_round_trip() -> None:
    old, new = variants(34, 33, 33), variants(50, 25, 25)
    table = rebalance(owners_of(fresh_table(old), old), new)
    ranges = encode_ranges(table, new)
    # v0 keeps 0-3399 and takes v1's and v2's surplus (their highest buckets); v1 and v2 keep their lowest.
    assert ranges == {"v0": "0-3399,5900-6699,9200-9999", "v1": "3400-5899", "v2": "6700-9199"}
    assert rebalance(decode_ranges("r", ranges), new) == table


@pytest.mark.parametrize(
    ("ranges", "says"),
    [
        ({"a": "0-10,5"}, "belongs to both"),
        ({"a": "9000-10000"}, "outside 0-9999"),
        ({"a": "ten"}, "ranges like"),
        ({"a": "0-5", "b": "5-6"}, "belongs to both 'a' and 'b'"),
    ],
)
def test_bad_ranges_are_refused(ranges: dict[str, str], says: str) -> None:
    with pytest.raises(InvalidRoute, match=says):
        decode_ranges("r", ranges)


def router(spec: dict[str, object], seed: int = 0) -> Router:
    store = RouteStore(None, 10)
    store.set(route_from_spec("r", spec))
    return Router(store, Experiments(retention=100, latency_samples=100), random.Random(seed))


def test_the_router_keeps_a_user_on_one_variant_and_spreads_keyless_requests() -> None:
    routes = router(
        {"variants": [{"name": "a", "adapter": "x", "weight": 50}, {"name": "b", "adapter": "y", "weight": 50}]}
    )
    for key in KEYS[:200]:
        first = routes.assign("r", key).variant.name
        assert all(routes.assign("r", key).variant.name == first for _ in range(3))
    keyless = Counter(routes.assign("r").variant.name for _ in range(2000))
    assert 900 < keyless["a"] < 1100 and keyless["a"] + keyless["b"] == 2000


def test_the_shadow_share_is_its_percent() -> None:
    spec = {"variants": [{"name": "a", "adapter": "x", "weight": 100}], "shadow": {"adapter": "base", "percent": 10}}
    routes = router(spec, seed=1)
    mirrored = sum(1 for _ in range(5000) if routes.assign("r").shadow is not None)
    assert 400 < mirrored < 600
