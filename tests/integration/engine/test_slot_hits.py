"""The device-slot hit rate means what it says, on a real engine: a request is a device hit only when its adapter
already sat in a slot when the request reached the head of the queue, never because its own prefetch placed it
while it waited. Counted through the real metrics listener, read back as ``loraplex_adapter_cache_requests_total``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loraplex.server.config import ObservabilitySettings
from loraplex.server.core.errors import AdapterNotFound
from loraplex.server.core.types import ResidencyTier
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import LoadedBase
from loraplex.server.observability.telemetry import Telemetry
from tests.integration.engine.conftest import collect
from tests.integration.engine.test_engine_behaviour import req, wait_until
from tests.support.adapters import QV, write_adapter


def lookups(telemetry: Telemetry) -> dict[tuple[str, str], float]:
    """(tier, result) -> requests so far."""
    return {
        (tier, result): telemetry.registry.get_sample_value(
            "loraplex_adapter_cache_requests_total", {"tier": tier, "result": result}
        )
        or 0.0
        for tier in ("host", "device")
        for result in ("hit", "miss")
    }


def on_device(engine: Engine, adapter_id: str) -> bool:
    try:
        return engine.adapter_info(adapter_id).tier is ResidencyTier.DEVICE
    except AdapterNotFound:  # its first load has not finished
        return False


def test_a_prefetched_cold_adapter_is_a_miss_and_its_next_request_a_hit(
    engine_factory: Any, base: LoadedBase, tmp_path: Path
) -> None:
    for seed, name in enumerate(("busy", "cold")):
        write_adapter(tmp_path / name, base.shape, rank=8, targets=QV, seed=seed)
    telemetry = Telemetry(ObservabilitySettings())
    engine: Engine = engine_factory([tmp_path], telemetry.listener, engine={"max_running": 1, "adapter_prefetch": 2})

    async def main() -> None:
        blocker = req(adapter="busy", max_new_tokens=400, ignore_eos=True)
        running = asyncio.create_task(collect(engine, blocker))
        await wait_until(lambda: engine.stats().running == 1, timeout=60)
        assert lookups(telemetry)[("device", "miss")] == 1  # busy: read from disk, then copied in
        queued = asyncio.create_task(collect(engine, req(adapter="cold", max_new_tokens=2)))
        # The only slot-free request waits behind the blocker; prefetch places its adapter meanwhile.
        await wait_until(lambda: on_device(engine, "cold"), timeout=60)
        assert engine.stats().waiting == 1 and not queued.done(), "the blocker finished before the prefetch"
        assert engine.cancel(blocker.request_id)
        assert (await queued).error is None
        await running
        after_first = lookups(telemetry)
        # Its request found it in a slot at admission, yet it was placed for that very request: a miss.
        assert after_first == {
            ("host", "hit"): 0,
            ("host", "miss"): 2,
            ("device", "hit"): 0,
            ("device", "miss"): 2,
        }
        assert (await collect(engine, req(adapter="cold", max_new_tokens=2))).error is None
        after_second = lookups(telemetry)
        assert after_second[("device", "hit")] == 1 and after_second[("device", "miss")] == 2
        assert after_second[("host", "hit")] == 1

    asyncio.run(main())
