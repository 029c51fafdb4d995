"""Prefetch: a waiting request's adapter is placed on the device before the step that admits it.

The real :class:`Scheduler`, KV cache and :class:`AdapterManager` over real adapter files, without a model: one
request runs (``max_running`` 1) while another waits on a second adapter. The device events are recorded in order:
the waiting adapter's host -> device copy comes from the prefetch pass while its request still waits, and its
admission then finds it on the device (no copy). Its request still counts as a device miss (judged at its lookup,
before the prefetch it caused); the next request for it is a hit.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from loraplex.server.config import EngineSettings
from loraplex.server.core.events import EngineListener, Tier
from loraplex.server.engine.scheduler import Scheduler
from loraplex.server.engine.sequence import Sequence, Status
from loraplex.server.lora.cache import AdapterManager
from loraplex.server.lora.format import AdapterLimits
from loraplex.server.lora.pool import DeviceSlots
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.model.kv_cache import KVCache
from tests.support.adapters import write_adapter
from tests.support.shapes import TINY_SHAPE as SHAPE


class DeviceEvents(EngineListener):
    def __init__(self) -> None:
        self.events: list[str] = []

    def adapter_lookup(self, tier: Tier, hit: bool) -> None:
        if tier == "device":
            self.events.append("device hit" if hit else "device miss")

    def adapter_loaded(self, tier: Tier, outcome: Literal["ok", "rejected", "error"], seconds: float) -> None:
        if tier == "device":
            self.events.append("copied to device")


def _sequence(adapter_id: str) -> Sequence:
    request: Any = SimpleNamespace(
        request_id=adapter_id, adapter_id=adapter_id, deadline=None, tenant=None, tenant_weight=1.0, cache_salt=None
    )
    none: Any = None
    return Sequence(request, [1, 2, 3], none, none, none, none, frozenset(), None, 0.0)


def test_waiting_adapter_is_placed_before_its_request_is_admitted(tmp_path: Path) -> None:
    for seed, name in enumerate(("a", "b")):
        write_adapter(tmp_path / name, SHAPE, 8, seed=seed)
    listener = DeviceEvents()
    slots = DeviceSlots(SHAPE, 4, 1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    manager = AdapterManager(
        AdapterRoots.of([tmp_path]), SHAPE, AdapterLimits(64, 1 << 30), slots, 1 << 30, 1, listener=listener
    )
    kv = KVCache(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, 256, torch.float32, torch.device("cpu"))
    scheduler = Scheduler(EngineSettings(max_running=1, adapter_prefetch=2), kv, manager)
    first, second = _sequence("a"), _sequence("b")
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule()  # starts a's lookup
    first.adapter_future.result(10)  # type: ignore[union-attr]
    chunks, _ = scheduler.schedule()
    assert [chunk.seq for chunk in chunks] == [first] and listener.events == ["device miss", "copied to device"]
    listener.events.clear()
    scheduler.schedule()  # with a running, b is now among the next waiting: its lookup starts
    version = second.adapter_future.result(10)  # type: ignore[union-attr]
    assert version.placement is None and listener.events == ["device miss"]
    assert scheduler.prefetch() == 1
    assert second.status is Status.WAITING and version.placement is not None and version.refs == 0
    listener.events.clear()
    scheduler.remove(first, served=True)
    chunks, _ = scheduler.schedule()
    assert [chunk.seq for chunk in chunks] == [second] and second.adapter_acquired
    assert listener.events == []  # admission found it placed: no copy in the admitting step
    third = _sequence("b")
    scheduler.add(third)
    scheduler.schedule()
    assert listener.events == ["device hit"]  # b was in a slot before this request arrived
    manager.shutdown()


def test_prefetch_never_takes_a_slot_a_running_adapter_holds(tmp_path: Path) -> None:
    for seed, name in enumerate(("a", "b")):
        write_adapter(tmp_path / name, SHAPE, 8, seed=seed)
    slots = DeviceSlots(SHAPE, 1, 1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    manager = AdapterManager(AdapterRoots.of([tmp_path]), SHAPE, AdapterLimits(64, 1 << 30), slots, 1 << 30, 1)
    running, waiting = manager.lookup("a").result(10), manager.lookup("b").result(10)
    assert manager.acquire_resident(running)
    assert not manager.prefetch(waiting)
    assert running.placement is not None and waiting.placement is None
    manager.release(running, served=True)
    assert manager.prefetch(waiting)  # a is idle now: its own pool's LRU head gives b its slot
    assert running.placement is None and waiting.placement is not None and slots.reallocations == 0
    manager.shutdown()
