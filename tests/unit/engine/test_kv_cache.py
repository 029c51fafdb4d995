"""KV cache regions: first-fit allocation, merging frees, compaction that keeps every sequence's data."""

from __future__ import annotations

import itertools
import random

import torch

from loraplex.server.engine.kv_cache import KVCache, Region, RegionAllocator


def test_allocate_free_merge_roundtrip() -> None:
    allocator = RegionAllocator(100)
    a, b, c = allocator.allocate(30), allocator.allocate(30), allocator.allocate(30)
    assert (a, b, c) == (Region(0, 30), Region(30, 30), Region(60, 30))
    assert allocator.allocate(20) is None
    allocator.free(b)
    assert allocator.largest_free == 30
    allocator.free(a)
    assert allocator.largest_free == 60  # a and b merged
    allocator.free(c)
    assert allocator.largest_free == 100 and allocator.used == 0


def test_random_churn_never_overlaps_and_accounts_exactly() -> None:
    rng = random.Random(0)
    allocator = RegionAllocator(1000)
    live: list[Region] = []
    for _ in range(2000):
        if live and rng.random() < 0.5:
            allocator.free(live.pop(rng.randrange(len(live))))
        else:
            region = allocator.allocate(rng.randint(1, 80))
            if region is not None:
                live.append(region)
        taken = sorted(live, key=lambda r: r.start)
        assert all(x.end <= y.start for x, y in itertools.pairwise(taken))
        assert allocator.used == sum(r.length for r in live)
        assert all(r.start >= 0 and r.end <= 1000 for r in live)


def test_compaction_moves_data_with_regions() -> None:
    cache = KVCache(
        num_layers=2, num_kv_heads=2, head_dim=4, capacity=64, dtype=torch.float32, device=torch.device("cpu")
    )
    first, gap, second = cache.allocator.allocate(10), cache.allocator.allocate(20), cache.allocator.allocate(10)
    assert first and gap and second
    for region, value in ((first, 1.0), (second, 2.0)):
        index = torch.arange(region.start, region.end)
        keys = torch.full((region.length, 2, 4), value)
        cache.write(1, index, keys, -keys)
    cache.allocator.free(gap)
    moved = cache.compact([second, first])
    assert moved == [Region(10, 10), Region(0, 10)]
    k, v = cache.view(1, 10, 10)
    assert torch.all(k == 2.0) and torch.all(v == -2.0)
    k, _ = cache.view(1, 0, 10)
    assert torch.all(k == 1.0)
    assert cache.allocator.largest_free == 44
