"""The KV block pool's prefix cache: reference counts, publishing, LRU eviction order, and that a referenced block
is never evicted or freed under another sequence."""

from __future__ import annotations

import random

import pytest

from loraplex.server.model.kv_cache import BlockPool


def _key(n: int) -> bytes:
    return n.to_bytes(32, "little")


def test_a_published_block_outlives_its_sequence_and_is_found_again() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert blocks is not None
    assert pool.publish(blocks[0], _key(0)) and pool.publish(blocks[1], _key(1))
    pool.free(reversed(blocks))
    assert pool.num_free == 4 and pool.num_used == 0 and pool.num_cached == 2
    assert pool.lookup([_key(0), _key(1), _key(2)]) == blocks[:2]
    assert pool.lookup([_key(1)]) == [blocks[1]]  # (the chain is the caller's: keys name whole prefixes)
    assert pool.lookup([_key(5), _key(0)]) == []  # only a run from the first key counts
    pool.share(blocks[:2])
    assert pool.num_used == 2 and pool.num_free == 2


def test_sharing_counts_references_and_the_last_release_makes_it_idle() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1) or []
    pool.publish(block, _key(7))
    pool.share([block])  # a second sequence
    pool.free([block])
    assert pool.num_used == 1  # still referenced by the other
    assert pool.allocate(2) is None  # the referenced block is not up for eviction
    pool.free([block])
    assert pool.num_used == 0 and pool.lookup([_key(7)]) == [block]
    with pytest.raises(ValueError):
        pool.free([block])  # no reference left to drop


def test_allocation_takes_free_blocks_before_evicting_idle_cached_ones_oldest_first() -> None:
    pool = BlockPool(4)
    first = pool.allocate(2) or []
    second = pool.allocate(1) or []
    for index, block in enumerate(first + second):
        pool.publish(block, _key(index))
    pool.free(reversed(first))  # released tail first: first[1] is the least recently released
    pool.free(second)
    assert pool.allocate(1) is not None and pool.evictions == 0  # the one never-used block
    (taken,) = pool.allocate(1) or []
    assert taken == first[1] and pool.evictions == 1
    assert pool.lookup([_key(0), _key(1)]) == [first[0]]  # the evicted key is gone, the prefix before it stays
    (taken,) = pool.allocate(1) or []
    assert taken == first[0]
    pool.share(second)  # from idle back to referenced: not evictable
    assert pool.allocate(1) is None and pool.evictions == 2


def test_a_key_names_one_block_and_publishing_needs_a_reference() -> None:
    pool = BlockPool(3)
    one, two = pool.allocate(2) or []
    assert pool.publish(one, _key(1))
    assert not pool.publish(two, _key(1))  # computed twice meanwhile: the second copy stays private
    assert not pool.publish(one, _key(2))
    pool.free([two])
    assert pool.num_cached == 1 and pool.num_free == 2  # the private copy went back to the free list
    with pytest.raises(ValueError):
        pool.publish(two, _key(3))
    with pytest.raises(ValueError):
        pool.share([two])  # not published


def test_random_traffic_never_hands_out_a_referenced_block() -> None:
    rng = random.Random(0)
    pool = BlockPool(32)
    live: list[list[int]] = []
    for step in range(3000):
        if live and rng.random() < 0.45:
            pool.free(reversed(live.pop(rng.randrange(len(live)))))
            continue
        hits = pool.lookup([_key(k) for k in range(rng.randint(0, 4))])
        pool.share(hits)
        fresh = pool.allocate(rng.randint(0, 5))
        if fresh is None:
            pool.free(reversed(hits))
            continue
        held = {block for table in live for block in table}
        assert not held & set(fresh), "a block some sequence holds was handed out again"
        for offset, block in enumerate(fresh):
            pool.publish(block, _key(len(hits) + offset) if rng.random() < 0.5 else _key(1000 + step))
        live.append(hits + fresh)
        assert pool.num_used == len(held | set(hits) | set(fresh))
        assert pool.num_free + pool.num_used == pool.num_blocks
