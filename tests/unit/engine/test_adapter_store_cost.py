"""The emulated remote adapter store (``adapters.fetch_latency_ms`` / ``fetch_bytes_per_s``): a host-cache miss
waits the store's latency plus the weights file's size over its bandwidth before the files are read; a hit waits
nothing. The real :class:`AdapterManager` over real adapter files, and the settings as the server parses them."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loraplex.server.config import load_settings
from loraplex.server.lora.cache import AdapterManager
from loraplex.server.lora.format import WEIGHTS_FILE, AdapterLimits
from loraplex.server.lora.pool import DeviceSlots
from loraplex.server.lora.sources import AdapterRoots, StoreCost
from tests.support.adapters import write_adapter
from tests.support.shapes import TINY_SHAPE as SHAPE

LATENCY_S = 0.3


def test_the_wait_is_the_latency_plus_the_weights_over_the_bandwidth(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a", SHAPE, 8, seed=0)
    size = (tmp_path / "a" / WEIGHTS_FILE).stat().st_size
    assert StoreCost().wait_s(tmp_path / "a") == 0.0
    assert StoreCost(latency_s=0.25).wait_s(tmp_path / "a") == 0.25
    assert StoreCost(latency_s=0.25, bytes_per_s=size * 2).wait_s(tmp_path / "a") == 0.75


def test_a_host_miss_waits_for_the_store_and_a_hit_does_not(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a", SHAPE, 8, seed=0)
    slots = DeviceSlots(SHAPE, 2, 1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    limits = AdapterLimits(max_rank=64, max_file_bytes=1 << 30)
    manager = AdapterManager(
        AdapterRoots.of([tmp_path]), SHAPE, limits, slots, 1 << 30, 1, store_cost=StoreCost(latency_s=LATENCY_S)
    )
    try:
        started = time.perf_counter()
        first = manager.lookup("a").result(30)
        missed = time.perf_counter() - started
        started = time.perf_counter()
        assert manager.lookup("a").result(0) is first
        hit = time.perf_counter() - started
    finally:
        manager.shutdown()
    assert missed >= LATENCY_S
    assert hit < LATENCY_S / 10


def test_the_settings_default_to_a_local_store_and_parse_from_the_environment() -> None:
    defaults = load_settings(None, environ={}).adapters
    assert (defaults.fetch_latency_ms, defaults.fetch_bytes_per_s) == (0, 0)
    env = {"LORAPLEX_ADAPTERS__FETCH_LATENCY_MS": "150", "LORAPLEX_ADAPTERS__FETCH_BYTES_PER_S": "1000000"}
    adapters = load_settings(None, environ=env).adapters
    assert (adapters.fetch_latency_ms, adapters.fetch_bytes_per_s) == (150.0, 1_000_000)
