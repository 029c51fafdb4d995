"""Adapter residency against retirement on other threads: a version a sequence acquired keeps its device slot
through an unload or a replace until the sequence releases it, and a retired version is never acquired.

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

from loraplex.server.engine.errors import AdapterNotFound
from loraplex.server.lora.cache import AdapterManager, AdapterVersion, Retired
from loraplex.server.lora.format import AdapterLimits
from loraplex.server.lora.pool import DeviceSlots
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.model.shape import ModelShape
from tests.support.adapters import write_adapter

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


@pytest.fixture
def manager(tmp_path: Path) -> AdapterManager:
    for seed, name in enumerate(("a", "b")):
        write_adapter(tmp_path / name, SHAPE, 8, seed=seed)
    slots = DeviceSlots(SHAPE, max_slots=2, max_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    return AdapterManager(
        AdapterRoots.of([tmp_path]), SHAPE, AdapterLimits(max_rank=64, max_file_bytes=1 << 30), slots, 1 << 30, 1
    )


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
