"""Device slot pools: rank buckets, budgets, preallocated stacks that placing never moves, reclaiming bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.lora.format import AdapterLimits, read_adapter
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import SlotWindow
from loraplex.server.lora.pool import DeviceSlots, PoolKey, SlotPool, rank_bucket
from tests.support.adapters import ALL_LINEAR, QV, write_adapter
from tests.support.shapes import TINY_SHAPE as SHAPE

LIMITS = AdapterLimits(max_rank=128, max_file_bytes=1 << 30)


def _weights(tmp_path: Path, name: str, rank: int, targets=QV, seed: int = 0):
    return read_adapter(name, write_adapter(tmp_path / name, SHAPE, rank, targets, seed=seed), SHAPE, LIMITS)


@pytest.mark.parametrize(("rank", "bucket"), [(1, 8), (8, 8), (9, 16), (16, 16), (33, 64), (128, 128)])
def test_rank_bucket(rank: int, bucket: int) -> None:
    assert rank_bucket(rank) == bucket


def test_pool_key_separates_ranks_and_targets(tmp_path: Path) -> None:
    a, b, c = _weights(tmp_path, "a", 4), _weights(tmp_path, "b", 8, seed=1), _weights(tmp_path, "c", 8, ALL_LINEAR)
    assert PoolKey.of(a) == PoolKey.of(b) == PoolKey(8, ("q_proj", "v_proj"), False)
    assert PoolKey.of(c) != PoolKey.of(b)


def test_place_writes_padded_weights_and_release_frees(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, max_slots=4, max_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    weights = _weights(tmp_path, "a", 5)
    placement = slots.place(weights)
    assert placement is not None
    module = weights.modules[(1, "q_proj")]
    stacked_a = placement.pool.a["q_proj"][1][placement.slot]
    torch.testing.assert_close(stacked_a[:, :5], module.a.T)
    assert torch.all(stacked_a[:, 5:] == 0)
    torch.testing.assert_close(placement.pool.b["q_proj"][1][placement.slot][:5], module.b.T)
    assert "k_proj" not in placement.pool.a  # a q,v pool holds no other modules
    slots.release(placement)
    assert slots.used_slots == 0 and placement.pool.used == 0  # the empty pool keeps its stacks for its key


def _data_ptrs(pool: SlotPool) -> list[int]:
    return [stack.data_ptr() for stacks in (pool.a, pool.b) for per_layer in stacks.values() for stack in per_layer]


def test_pool_is_preallocated_and_placing_never_reallocates(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, max_slots=6, max_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    first = slots.place(_weights(tmp_path, "w0", 8))
    assert first is not None
    pool = first.pool
    assert pool.capacity == 6  # all the slots the budgets allow, at the first use of the key
    assert slots.allocated_bytes == 6 * pool.slot_bytes
    ptrs = _data_ptrs(pool)
    adapters = [_weights(tmp_path, f"w{i}", 8, seed=i) for i in range(1, 6)]
    placements = [slots.place(weights) for weights in adapters]
    assert [p.slot for p in placements if p is not None] == [1, 2, 3, 4, 5]
    assert _data_ptrs(pool) == ptrs and slots.reallocations == 0
    for weights, placement in zip(adapters, placements, strict=True):
        assert placement is not None
        torch.testing.assert_close(pool.a["q_proj"][1][placement.slot][:, :8], weights.modules[(1, "q_proj")].a.T)


def test_smaller_rank_in_a_reused_slot_sees_zeros_past_its_rank(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, max_slots=1, max_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    big = slots.place(_weights(tmp_path, "big", 8))
    assert big is not None
    slots.release(big)
    small = _weights(tmp_path, "small", 3, seed=1)
    placement = slots.place(small)
    assert placement is not None and placement.pool is big.pool and placement.slot == big.slot
    stacked_a = placement.pool.a["v_proj"][0][placement.slot]
    torch.testing.assert_close(stacked_a[:, :3], small.modules[(0, "v_proj")].a.T)
    assert torch.all(stacked_a[:, 3:] == 0) and torch.all(placement.pool.b["v_proj"][0][placement.slot][3:] == 0)


def test_slot_count_budget(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, max_slots=2, max_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    assert slots.place(_weights(tmp_path, "a", 8)) is not None
    assert slots.place(_weights(tmp_path, "b", 8, seed=1)) is not None
    assert slots.place(_weights(tmp_path, "c", 8, seed=2)) is None


def test_byte_budget_counts_allocated_capacity(tmp_path: Path) -> None:
    weights = _weights(tmp_path, "a", 8)
    one = DeviceSlots(SHAPE, 8, 1 << 30, torch.float32, torch.device("cpu")).slot_bytes(weights)
    slots = DeviceSlots(SHAPE, max_slots=8, max_bytes=3 * one, dtype=torch.float32, device=torch.device("cpu"))
    placed = [slots.place(_weights(tmp_path, f"w{i}", 8, seed=i)) for i in range(4)]
    assert [p is not None for p in placed] == [True, True, True, False]
    assert slots.allocated_bytes <= 3 * one


def test_new_pool_key_reclaims_the_free_tail_of_another_pool_and_keeps_its_weights(tmp_path: Path) -> None:
    """Four rank-8 slots fill the byte budget; with two of them used, a rank-16 adapter gets its bytes by cutting
    the rank-8 pool's free tail (the used slots compacted and kept), and the budget holds throughout."""
    r8 = SlotPool.bytes_per_slot(PoolKey(8, ("q_proj", "v_proj"), False), SHAPE, 4)
    slots = DeviceSlots(SHAPE, max_slots=8, max_bytes=4 * r8, dtype=torch.float32, device=torch.device("cpu"))
    adapters = [_weights(tmp_path, f"w{i}", 8, seed=i) for i in range(4)]
    placements = [slots.place(w) for w in adapters]
    assert all(p is not None for p in placements) and slots.allocated_bytes == 4 * r8
    slots.release(placements[0])  # type: ignore[arg-type]
    slots.release(placements[2])  # type: ignore[arg-type]
    wide = _weights(tmp_path, "wide", 16, seed=9)
    assert slots.place(wide) is None  # no free bytes: the caller reclaims
    assert slots.reclaim(wide) and slots.reallocations == 1
    placed = slots.place(wide)
    assert placed is not None and placed.pool.capacity == 1
    assert slots.allocated_bytes <= slots.max_bytes
    for weights, placement in ((adapters[1], placements[1]), (adapters[3], placements[3])):
        assert placement is not None and placement.slot < 2 and placement.pool.capacity == 2
        torch.testing.assert_close(
            placement.pool.a["v_proj"][0][placement.slot][:, :8], weights.modules[(0, "v_proj")].a.T
        )
    assert not slots.reclaim(wide)  # nothing free left elsewhere


def test_reclaim_drops_an_empty_pool_without_copying(tmp_path: Path) -> None:
    r8 = SlotPool.bytes_per_slot(PoolKey(8, ("q_proj", "v_proj"), False), SHAPE, 4)
    slots = DeviceSlots(SHAPE, max_slots=8, max_bytes=4 * r8, dtype=torch.float32, device=torch.device("cpu"))
    placement = slots.place(_weights(tmp_path, "a", 8))
    assert placement is not None
    slots.release(placement)
    wide = _weights(tmp_path, "wide", 16, seed=1)
    assert slots.reclaim(wide) and slots.reallocations == 0 and not slots.pools
    grown = slots.place(wide)
    assert grown is not None and grown.pool.capacity == 2  # 4 rank-8 slots' bytes hold 2 rank-16 ones


def test_mapping_gives_decode_segments_a_slot_window() -> None:
    """One row per slot within 2x the rows: a window (None offsets when the rows fill it); repeated slots or a wide
    spread: no window (the gather or grouped kernel)."""
    pool = SlotPool(PoolKey(8, ("q_proj", "v_proj"), False), SHAPE, 16, torch.float32, torch.device("cpu"))
    cpu = torch.device("cpu")

    def window(slots: list[int]) -> SlotWindow | None:
        return LoraMapping.build([(pool, slot, 1) for slot in slots], cpu).segments[0].window

    assert window([2, 3, 4]) == SlotWindow(2, 3, None)
    gapped = window([1, 2, 4])
    assert gapped is not None and (gapped.first, gapped.width) == (1, 4)
    assert gapped.local is not None and gapped.local.tolist() == [0, 1, 3]
    assert window([0, 15]) is None  # 16 slots wide for 2 rows
    assert LoraMapping.build([(pool, 3, 2), (pool, 4, 1)], cpu).segments[0].window is None  # a prompt chunk
