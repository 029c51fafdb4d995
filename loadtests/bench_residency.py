"""Device-residency micro-benchmark: what placing adapters costs the engine thread when the device is full.

The real :class:`AdapterManager` and device slots, on the embedded base's shape, without the model: ``--adapters``
q,v float16 adapters of mixed ranks (8, 16, 32, 64 in turn, so four pools compete for the byte budget) are read
into the host cache first; then ``--placements`` uniformly drawn adapters are each made resident and acquired, then
released, as the scheduler does at admission. Every placement that misses the device runs on the engine thread,
between steps, so its time is time every running request waits. Printed: total engine-thread time, p50 / p99 / max
per placement, evictions, and how much of the budget was in use.

    python loadtests/bench_residency.py                      # 64 adapters, 200 MiB budget, 600 placements
    python loadtests/bench_residency.py --device-mib 1000    # slot-count bound instead of byte bound
    python loadtests/bench_residency.py --cold-load          # cold load p50 per rank: disk -> host, host -> device

``--cold-load``: per rank (8, 16, 32, 64), ``--cold-adapters`` q,v float16 adapters never read before by a fresh
manager are each looked up (disk -> host: read, validation, conversion, on a loader thread) and then made resident
(host -> device: a slot write, the pool created at the first one); printed as p50 / max milliseconds per rank.

Run it from two checkouts (before / after a change) one after the other to compare.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*: this file's siblings

from loadtests.run_loadtest import embedded_shape  # noqa: E402
from loadtests.synthetic_adapters import write_adapter  # noqa: E402
from loraplex.server.config import default_cache_dir  # noqa: E402
from loraplex.server.core.events import EngineListener, Tier  # noqa: E402
from loraplex.server.lora.cache import AdapterManager  # noqa: E402
from loraplex.server.lora.format import AdapterLimits  # noqa: E402
from loraplex.server.lora.ops import lora_stack_dtype  # noqa: E402
from loraplex.server.lora.pool import DeviceSlots  # noqa: E402
from loraplex.server.lora.sources import AdapterRoots  # noqa: E402
from loraplex.server.model.loader import resolve_dtype  # noqa: E402

RANKS = (8, 16, 32, 64)


class EvictionCount(EngineListener):
    def __init__(self) -> None:
        self.evictions = 0

    def adapter_evicted(self, tier: Tier) -> None:
        self.evictions += tier == "device"


def _percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return round(ordered[int(q * (len(ordered) - 1))], 2)


def cold_load(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """p50 / max of disk -> host and host -> device per rank, each adapter read by a manager that never saw it."""
    shape = embedded_shape()
    figures: dict[str, dict[str, float]] = {}
    for rank in RANKS:
        ids = [f"cold-r{rank}-{i:02d}" for i in range(args.cold_adapters)]
        for index, adapter_id in enumerate(ids):
            if not (args.root / adapter_id / "adapter_config.json").exists():
                write_adapter(args.root / adapter_id, shape, rank, seed=1000 + index, dtype=torch.float16)
        slots = DeviceSlots(shape, args.device_slots, args.device_mib << 20, args.stack_dtype, torch.device("cpu"))
        manager = AdapterManager(AdapterRoots.of([args.root]), shape, AdapterLimits(128, 1 << 30), slots, 8 << 30, 1)
        to_host: list[float] = []
        to_device: list[float] = []
        for adapter_id in ids:
            started = time.perf_counter()
            version = manager.lookup(adapter_id).result()
            placed = time.perf_counter()
            if not manager.acquire_resident(version):
                raise RuntimeError(f"{adapter_id} could not be placed")
            done = time.perf_counter()
            manager.release(version, served=False)
            to_host.append((placed - started) * 1e3)
            to_device.append((done - placed) * 1e3)
        manager.shutdown()
        total = [h + d for h, d in zip(to_host, to_device, strict=True)]
        figures[f"r{rank}"] = {
            "disk_to_host_p50_ms": round(statistics.median(to_host), 2),
            "host_to_device_p50_ms": round(statistics.median(to_device), 2),
            "total_p50_ms": round(statistics.median(total), 2),
            "total_max_ms": _percentile(total, 1.0),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--placements", type=int, default=600)
    parser.add_argument("--device-slots", type=int, default=32)
    parser.add_argument("--device-mib", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=default_cache_dir() / "residency-adapters")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cold-load", action="store_true", help="cold load latency per rank instead")
    parser.add_argument("--cold-adapters", type=int, default=12, help="adapters per rank in --cold-load")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the base's model.dtype; the slot stacks get the dtype the server gives them for it (auto: bfloat16 "
        "on a CPU with native bfloat16 and the fused kernel, else float32)",
    )
    args = parser.parse_args()
    cpu = torch.device("cpu")
    args.stack_dtype = lora_stack_dtype(cpu, resolve_dtype(args.dtype, cpu))
    print(f"slot stacks: {args.stack_dtype}", file=sys.stderr)
    if args.cold_load:
        cold = cold_load(args)
        print(json.dumps(cold))
        if args.json:
            args.json.write_text(json.dumps(cold, indent=2) + "\n")
        return

    shape = embedded_shape()
    ids = [f"m{i:03d}" for i in range(args.adapters)]
    for index, adapter_id in enumerate(ids):
        if not (args.root / adapter_id / "adapter_config.json").exists():
            write_adapter(args.root / adapter_id, shape, RANKS[index % 4], seed=index, dtype=torch.float16)
    budget = args.device_mib << 20
    slots = DeviceSlots(shape, args.device_slots, budget, args.stack_dtype, torch.device("cpu"))
    listener = EvictionCount()
    manager = AdapterManager(
        AdapterRoots.of([args.root]), shape, AdapterLimits(128, 1 << 30), slots, 8 << 30, 1, listener=listener
    )
    versions = {adapter_id: manager.lookup(adapter_id).result() for adapter_id in ids}
    chooser = random.Random(args.seed)
    times: list[float] = []
    peak = 0
    for _ in range(args.placements):
        version = versions[chooser.choice(ids)]
        started = time.perf_counter()
        if not manager.acquire_resident(version):
            raise RuntimeError(f"{version.adapter_id} could not be placed")
        times.append((time.perf_counter() - started) * 1e3)
        peak = max(peak, slots.allocated_bytes)
        manager.release(version, served=False)
    manager.shutdown()
    times.sort()
    figures = {
        "adapters": args.adapters,
        "placements": args.placements,
        "device_slots": args.device_slots,
        "device_mib": args.device_mib,
        "engine_thread_ms_total": round(sum(times), 1),
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
        "max_ms": round(times[-1], 2),
        "evictions": listener.evictions,
        "peak_allocated_mib": round(peak / 2**20, 1),
    }
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
