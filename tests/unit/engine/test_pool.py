"""Device slot pools: rank buckets, budgets, growth, compaction and eviction-free reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.lora.format import AdapterLimits, read_adapter
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import SlotWindow
from loraplex.server.lora.pool import DeviceSlots, PoolKey, SlotPool, rank_bucket
from loraplex.server.model.shape import ModelShape
from tests.support.adapters import ALL_LINEAR, QV, write_adapter

SHAPE = ModelShape(
    "llama",
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=100,
)
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
    assert slots.used_slots == 0 and not slots.pools  # an empty pool gives its memory back


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


def test_shrink_compacts_and_keeps_weights(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, max_slots=8, max_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    adapters = [_weights(tmp_path, f"w{i}", 8, seed=i) for i in range(4)]
    placements = [slots.place(w) for w in adapters]
    assert all(p is not None for p in placements)
    slots.release(placements[0])  # type: ignore[arg-type]
    slots.release(placements[2])  # type: ignore[arg-type]
    freed = slots.shrink()
    assert freed > 0
    for weights, placement in ((adapters[1], placements[1]), (adapters[3], placements[3])):
        assert placement is not None and placement.slot < 2
        torch.testing.assert_close(
            placement.pool.a["v_proj"][0][placement.slot][:, :8], weights.modules[(0, "v_proj")].a.T
        )
    assert next(iter(slots.pools.values())).capacity == 2


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
