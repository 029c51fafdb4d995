"""The paged KV cache: block allocation and freeing, slot arithmetic, writes through block tables."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.server.model.kv_cache import BlockAllocator, KVCache, blocks_for


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_is_all_or_nothing_and_free_returns_blocks() -> None:
    allocator = BlockAllocator(10)
    first = allocator.allocate(4)
    second = allocator.allocate(6)
    assert first is not None and second is not None
    assert sorted(first + second) == list(range(10))
    assert allocator.num_free == 0 and allocator.allocate(1) is None
    allocator.free(first)
    assert allocator.num_free == 4 and allocator.num_used == 6
    assert allocator.allocate(5) is None and allocator.num_free == 4  # nothing taken by a refused request
    again = allocator.allocate(4)
    assert again is not None and sorted(again) == sorted(first)


def test_double_and_foreign_frees_are_refused() -> None:
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    assert blocks is not None
    allocator.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free(blocks[:1])
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free([7])
    assert allocator.num_free == 4


def test_random_churn_never_hands_out_a_block_twice() -> None:
    rng = random.Random(0)
    allocator = BlockAllocator(64)
    live: list[list[int]] = []
    for _ in range(3000):
        if live and rng.random() < 0.5:
            allocator.free(live.pop(rng.randrange(len(live))))
        else:
            blocks = allocator.allocate(rng.randint(0, 9))
            if blocks is not None:
                live.append(blocks)
        held = [block for blocks in live for block in blocks]
        assert len(held) == len(set(held)) == allocator.num_used
        assert all(0 <= block < 64 for block in held)


def test_capacity_rounds_up_to_blocks_and_usage_counts_blocks() -> None:
    cache = KVCache(2, 2, 4, capacity=100, dtype=torch.float32, device=torch.device("cpu"), block_size=16)
    assert cache.num_blocks == 7 and cache.capacity == 112
    assert cache.k[0].shape == (112, 2, 4)
    assert cache.usage == 0.0
    cache.allocator.allocate(3)
    assert cache.usage == pytest.approx(3 / 7)


def test_writes_land_in_the_sequences_blocks() -> None:
    cache = KVCache(2, 2, 4, capacity=64, dtype=torch.float32, device=torch.device("cpu"), block_size=4)
    table = [9, 2, 13]  # scattered blocks: positions 0-3 in block 9, 4-7 in block 2, 8-9 in block 13
    slots = cache.slots(table, 0, 10)
    assert slots == [36, 37, 38, 39, 8, 9, 10, 11, 52, 53]
    assert cache.slots(table, 6, 9) == slots[6:9]
    keys = torch.arange(10 * 8, dtype=torch.float32).view(10, 2, 4)
    cache.write(1, torch.tensor(slots), keys, -keys)
    assert torch.equal(cache.k[1][slots], keys) and torch.equal(cache.v[1][slots], -keys)
    assert torch.count_nonzero(cache.k[0]) == 0  # other layers untouched
    untouched = torch.ones(cache.capacity, dtype=torch.bool)
    untouched[slots] = False
    assert torch.count_nonzero(cache.k[1][untouched]) == 0
