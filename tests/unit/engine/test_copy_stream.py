"""Slot writes and step reads are ordered by the copy stream's events: the ordering logic, on CPU.

The real :class:`DeviceSlots` and :class:`AdapterManager` over real adapter files. On CPU the copy stream is the
current one and its events are complete when recorded, but the fences ask for the same waits as on CUDA, and the
stream counts them: a step waits for a slot's write once (the first step that reads it), a write into a slot waits
for the last step that read it, a write into a slot no step read waits for nothing, and work on whole stacks (a new
pool, a grown one) orders both streams so neither table needs a wait afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.lora.cache import AdapterManager
from loraplex.server.lora.format import AdapterLimits, AdapterWeights, read_adapter
from loraplex.server.lora.pool import DeviceSlots, Placement, PoolKey, SlotImage
from loraplex.server.lora.sources import AdapterRoots
from tests.support.adapters import ALL_LINEAR, QV, write_adapter
from tests.support.shapes import TINY_SHAPE as SHAPE

CPU = torch.device("cpu")
LIMITS = AdapterLimits(max_rank=64, max_file_bytes=1 << 30)


def _read(root: Path, name: str, rank: int, seed: int, targets: tuple[str, ...] = QV) -> AdapterWeights:
    write_adapter(root / name, SHAPE, rank, targets, seed=seed)
    return read_adapter(name, root / name, SHAPE, LIMITS)


def _assert_slot_holds(placement: Placement, weights: AdapterWeights) -> None:
    """The slot's stacks hold ``weights`` as the old per-module write laid them out: ``a.T`` / ``b.T`` in the
    first ``r`` of the pool's rank (cast to the stacks' dtype), zeros after."""
    pool, slot = placement.pool, placement.slot
    for (layer, module), found in weights.modules.items():
        rank = found.a.shape[0]
        a, b = pool.a[module][layer][slot], pool.b[module][layer][slot]
        assert torch.equal(a[:, :rank], found.a.T.to(pool.dtype)) and not a[:, rank:].any()
        assert torch.equal(b[:rank], found.b.T.to(pool.dtype)) and not b[rank:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_is_the_slot_layout_and_counts_the_slot_bytes(tmp_path: Path, dtype: torch.dtype) -> None:
    slots = DeviceSlots(SHAPE, 4, 1 << 30, dtype, CPU)
    weights = _read(tmp_path, "r12", 12, seed=0, targets=ALL_LINEAR)  # rank 12 in the 16 bucket
    image = slots.image(weights)
    assert image.key == PoolKey.of(weights) and image.key.rank == 16
    assert image.nbytes == slots.slot_bytes(weights) and image.flat.dtype == dtype
    assert not image.flat.is_pinned()  # no pinning without CUDA
    placement = slots.place_image(image)
    assert placement is not None
    _assert_slot_holds(placement, weights)
    bigger = _read(tmp_path, "r16", 16, seed=1, targets=ALL_LINEAR)
    slots.release(placement)
    again = slots.place(bigger)  # same slot: rank 16 fills the bucket
    assert again is not None and again.slot == placement.slot
    _assert_slot_holds(again, bigger)
    slots.release(again)
    last = slots.place_image(image)  # rank 12 again: the 4 columns rank 16 wrote are zero
    assert last is not None and last.slot == placement.slot
    _assert_slot_holds(last, weights)


def test_steps_wait_for_writes_once_and_writes_wait_for_the_steps_that_read_the_slot(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, 3, 1 << 30, torch.float32, CPU)
    copies = slots.copies
    a, b, c = (slots.image(_read(tmp_path, name, 8, seed=i)) for i, name in enumerate("abc"))
    first = slots.place_image(a)  # creates the pool (3 slots): whole-stack work, then the write
    assert first is not None and (copies.compute_waits, copies.copy_waits) == (0, 0)
    with slots.reading([first, None]):  # None: a base-model row
        pass
    assert copies.compute_waits == 1  # the first step to read the slot waits for its write
    with slots.reading([first]):
        pass
    assert copies.compute_waits == 1  # once: later steps come after the first on the compute stream
    slot = first.slot
    slots.release(first)
    second = slots.place_image(b)
    assert second is not None and second.slot == slot
    assert copies.copy_waits == 1  # overwriting a slot the last step read: the copy waits for that step
    third = slots.place_image(c)
    assert third is not None and third.slot != slot and copies.copy_waits == 1  # a slot no step read: no wait
    with slots.reading([second, third]):
        pass
    assert copies.compute_waits == 3


def test_work_on_whole_stacks_orders_both_streams(tmp_path: Path) -> None:
    slots = DeviceSlots(SHAPE, 4, 1 << 30, torch.float32, CPU)
    weights = [_read(tmp_path, f"w{i}", 8, seed=i) for i in range(3)]
    placed = [slots.place_image(slots.image(w)) for w in weights[:2]]
    assert all(p is not None for p in placed)
    with slots.reading(placed[:1]):
        pass
    pool = placed[0].pool  # type: ignore[union-attr]
    waits = slots.copies.compute_waits
    pool.grow(pool.capacity + 2)  # new stacks on the compute stream, after every copy, before any later one
    with slots.reading(placed):
        pass
    assert slots.copies.compute_waits == waits  # placed[1]'s write came before the growth: nothing to wait for
    slots.release(placed[0])  # type: ignore[arg-type]
    copy_waits = slots.copies.copy_waits
    again = slots.place_image(slots.image(weights[2]))
    assert again is not None and again.slot == placed[0].slot  # type: ignore[union-attr]
    assert slots.copies.copy_waits == copy_waits + 1  # the step after the growth read it
    for placement, w in zip([again, placed[1]], [weights[2], weights[1]], strict=True):
        _assert_slot_holds(placement, w)  # type: ignore[arg-type]


def test_manager_never_overwrites_a_slot_a_running_sequence_reads(tmp_path: Path) -> None:
    """Two slots, three adapters: while a and b are referenced (running), c waits; once a is released, c takes a's
    slot, its write waits for the step that last read a, and b's slot (read by the current step) is untouched."""
    names = ("a", "b", "c")
    for seed, name in enumerate(names):
        write_adapter(tmp_path / name, SHAPE, 8, seed=seed)
    slots = DeviceSlots(SHAPE, 2, 1 << 30, torch.float32, CPU)
    manager = AdapterManager(AdapterRoots.of([tmp_path]), SHAPE, LIMITS, slots, 1 << 30, 1)
    a, b, c = (manager.lookup(name).result(10) for name in names)
    assert manager.acquire_resident(a) and manager.acquire_resident(b)
    assert a.placement is not None and b.placement is not None
    a_slot = a.placement.slot
    with slots.reading([a.placement, b.placement]):  # a step of both
        pass
    assert not manager.acquire_resident(c) and not manager.prefetch(c)  # both slots in use: c waits
    assert slots.copies.copy_waits == 0
    manager.release(a, served=True)
    assert manager.acquire_resident(c)  # evicts idle a, writes into its slot
    assert a.placement is None and c.placement is not None and c.placement.slot == a_slot
    assert slots.copies.copy_waits == 1
    for version in (b, c):
        assert version.placement is not None
        name = version.adapter_id
        _assert_slot_holds(version.placement, read_adapter(name, tmp_path / name, SHAPE, LIMITS))
    with slots.reading([b.placement, c.placement]):
        pass
    assert slots.copies.compute_waits == 3  # a, b, then c: each write waited for once
    manager.shutdown()


def test_host_tier_holds_slot_images_within_its_byte_budget(tmp_path: Path) -> None:
    """The host budget counts the images' bytes: two rank-12 images (padded to 16) fit, a third evicts the least
    recently used; the kept versions' host copies are slot images in the stacks' dtype."""
    for seed, name in enumerate("xyz"):
        write_adapter(tmp_path / name, SHAPE, 12, seed=seed)
    slots = DeviceSlots(SHAPE, 4, 1 << 30, torch.bfloat16, CPU)
    image_bytes = SlotImage.build(
        read_adapter("x", tmp_path / "x", SHAPE, LIMITS), None, SHAPE, torch.bfloat16, pin=False
    ).nbytes
    manager = AdapterManager(AdapterRoots.of([tmp_path]), SHAPE, LIMITS, slots, 2 * image_bytes, 1)
    x, y = manager.lookup("x").result(10), manager.lookup("y").result(10)
    assert x.weights is not None and x.weights.flat.dtype == torch.bfloat16 and x.weights.nbytes == image_bytes
    assert x.size_bytes != image_bytes  # the float32 weights as read, reported; not what the host holds
    z = manager.lookup("z").result(10)
    assert x.weights is None and y.weights is not None and z.weights is not None
    manager.shutdown()
