"""Adapter residency: which adapter gives up its device slot, and retirement on other threads.

A version a sequence acquired keeps its device slot through an unload or a replace until the sequence releases it,
and a retired version is never acquired. When the device is full, an adapter takes the slot of the least recently
used idle adapter of its own pool (no pool resize) before any other pool is compacted or evicted from.

The real :class:`AdapterManager` over real adapter files; the engine thread's side (lookup, acquire, release) and
the admin side (unload, load, replace) run on their own threads, as in the server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import torch

from loraplex.server.core.errors import AdapterNotFound
from loraplex.server.lora.cache import AdapterManager, AdapterVersion, Retired
from loraplex.server.lora.format import AdapterLimits
from loraplex.server.lora.pool import DeviceSlots, PoolKey, SlotPool
from loraplex.server.lora.sources import AdapterRoots
from tests.support.adapters import write_adapter
from tests.support.shapes import TINY_SHAPE as SHAPE


def _manager(root: Path, max_slots: int, max_bytes: int = 1 << 30) -> AdapterManager:
    slots = DeviceSlots(SHAPE, max_slots, max_bytes, dtype=torch.float32, device=torch.device("cpu"))
    return AdapterManager(
        AdapterRoots.of([root]), SHAPE, AdapterLimits(max_rank=64, max_file_bytes=1 << 30), slots, 1 << 30, 1
    )


@pytest.fixture
def manager(tmp_path: Path) -> AdapterManager:
    for seed, name in enumerate(("a", "b")):
        write_adapter(tmp_path / name, SHAPE, 8, seed=seed)
    return _manager(tmp_path, max_slots=2)


def _slot_bytes(rank: int) -> int:
    return SlotPool.bytes_per_slot(PoolKey(rank, ("q_proj", "v_proj"), False), SHAPE, 4)


@pytest.fixture
def two_pools(tmp_path: Path) -> tuple[AdapterManager, dict[str, AdapterVersion]]:
    """A device budget of exactly four rank-8 slots and one rank-16 slot, all filled: a1-a4 (rank 8) and b1
    (rank 16, placed first, so the least recently used), none referenced; a5 (rank 8) is in memory, not placed."""
    names = {"b1": 16, "a1": 8, "a2": 8, "a3": 8, "a4": 8, "a5": 8}
    for seed, (name, rank) in enumerate(names.items()):
        write_adapter(tmp_path / name, SHAPE, rank, seed=seed)
    manager = _manager(tmp_path, max_slots=8, max_bytes=4 * _slot_bytes(8) + _slot_bytes(16))
    versions = {name: manager.lookup(name).result(10) for name in names}
    for name in list(names)[:-1]:
        assert manager.acquire_resident(versions[name]), name
        manager.release(versions[name], served=False)
    assert manager.slots.allocated_bytes == manager.slots.max_bytes
    return manager, versions


def test_full_device_evicts_from_the_adapters_own_pool_without_resizing(
    two_pools: tuple[AdapterManager, dict[str, AdapterVersion]],
) -> None:
    manager, versions = two_pools
    pool = versions["a1"].placement.pool  # type: ignore[union-attr]
    stack, slot = pool.a["q_proj"][0], versions["a1"].placement.slot  # type: ignore[union-attr]
    assert manager.acquire_resident(versions["a5"])
    assert versions["a1"].placement is None  # the least recently used of its own pool
    assert versions["b1"].placement is not None  # older, but in another pool: evicting it would force a resize
    placed = versions["a5"].placement
    assert placed is not None and placed.pool is pool and placed.slot == slot
    assert pool.capacity == 4 and pool.a["q_proj"][0] is stack  # the pool was neither grown nor copied
    torch.testing.assert_close(
        stack[slot][:, :8],
        manager.lookup("a5").result(10).weights.modules[(0, "q_proj")].a.T,  # type: ignore[union-attr]
    )


def test_full_device_evicts_another_pools_adapter_when_its_own_are_all_in_use(
    two_pools: tuple[AdapterManager, dict[str, AdapterVersion]],
) -> None:
    manager, versions = two_pools
    for name in ("a1", "a2", "a3", "a4"):
        assert manager.acquire_resident(versions[name])  # running: not evictable
    assert manager.acquire_resident(versions["a5"])
    assert versions["b1"].placement is None
    assert all(versions[name].placement is not None for name in ("a1", "a2", "a3", "a4", "a5"))
    assert manager.slots.allocated_bytes <= manager.slots.max_bytes


def test_pinned_adapter_is_never_evicted(two_pools: tuple[AdapterManager, dict[str, AdapterVersion]]) -> None:
    manager, versions = two_pools
    manager.set_pinned("a1", True)
    assert manager.acquire_resident(versions["a5"])
    assert versions["a1"].placement is not None and versions["a2"].placement is None  # the next least recent


def test_acquired_version_keeps_its_slot_through_unload(manager: AdapterManager) -> None:
    version = manager.lookup("a").result(10)
    assert manager.acquire_resident(version)
    placement = version.placement
    assert placement is not None and manager.slots.used_slots == 1
    manager.unload("a")
    assert version.retired is Retired.UNLOADED
    assert version.placement is placement and manager.slots.used_slots == 1  # still serving its sequence
    assert not manager.acquire_resident(version)  # but no new sequence takes it
    manager.release(version, served=True)
    assert version.placement is None and manager.slots.used_slots == 0


def test_replaced_version_is_not_acquired(manager: AdapterManager, tmp_path: Path) -> None:
    old = manager.lookup("a").result(10)
    write_adapter(tmp_path / "a", SHAPE, 8, seed=5)
    new = manager.load("a").result(10)
    assert new.version == old.version + 1 and old.retired is Retired.REPLACED
    assert not manager.acquire_resident(old)
    assert old.placement is None and manager.slots.used_slots == 0
    assert manager.acquire_resident(new) and new.placement is not None


def test_no_acquired_version_loses_its_slot_while_others_retire_it(manager: AdapterManager, tmp_path: Path) -> None:
    """The engine side acquires and releases while an admin thread unloads, loads and replaces the same adapter as
    fast as it can; every acquired version must stay placed until released (the race that once let a request run
    on the base model alone)."""
    stop = threading.Event()
    acquired = 0
    lost: list[str] = []

    def engine_side() -> None:
        nonlocal acquired
        while not stop.is_set():
            try:
                version: AdapterVersion = manager.lookup("a").result(10)
            except AdapterNotFound:
                continue
            if not manager.acquire_resident(version):
                continue
            acquired += 1
            for _ in range(3):
                if version.placement is None:
                    lost.append(f"v{version.version} ({version.retired})")
                time.sleep(0)
            manager.release(version, served=False)

    def admin_side() -> None:
        seed = 10
        while not stop.is_set():
            with contextlib.suppress(AdapterNotFound):  # the first round: nothing loaded yet
                manager.unload("a")
            manager.load("a").result(10)
            write_adapter(tmp_path / "a", SHAPE, 8, seed=seed)  # the next load replaces
            seed += 1
            manager.load("a").result(10)

    threads = [threading.Thread(target=engine_side), threading.Thread(target=admin_side)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert acquired > 20, "the engine side hardly ever acquired: the race was not exercised"
    assert lost == []
    assert manager.slots.used_slots <= 1  # nothing acquired now: at most the current version's idle slot
    manager.shutdown()


def test_host_tier_drops_placed_versions_first_then_the_least_recently_used(tmp_path: Path) -> None:
    for seed, name in enumerate(("a", "b", "c", "d")):
        write_adapter(tmp_path / name, SHAPE, 8, seed=seed)
    probe = _manager(tmp_path, max_slots=4)
    size = probe.lookup("a").result(10).size_bytes
    probe.shutdown()
    slots = DeviceSlots(SHAPE, 4, 1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    manager = AdapterManager(
        AdapterRoots.of([tmp_path]), SHAPE, AdapterLimits(max_rank=64, max_file_bytes=1 << 30), slots, 2 * size, 1
    )
    a, b = manager.lookup("a").result(10), manager.lookup("b").result(10)
    assert manager.acquire_resident(a)  # a is placed (its device copy serves) and the most recently used
    manager.release(a, served=True)
    c = manager.lookup("c").result(10)
    assert a.weights is None and a.placement is not None  # placed: its host copy goes first, though b is older
    assert b.weights is not None and c.weights is not None
    d = manager.lookup("d").result(10)
    assert b.weights is None and c.weights is not None and d.weights is not None  # then the least recently used
    manager.shutdown()
