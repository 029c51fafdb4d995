"""Start-up calibration of the batched-LoRA kernels: a timing table per (rows, distinct adapters) bucket, measured
once on the serving device, and the pure rule that picks a segment's kernel from it (the nearest bucket's fastest
kernel among those that can serve the segment).

On CUDA no fixed rule is measured (no GPU in the sessions that wrote this), so the device measures itself:
:func:`measure` times each candidate kernel's ``y += delta`` at :data:`BUCKETS` for the actual device and dtype, over
one layer of the served base (:class:`LayerShape`: its linears' dimensions at a typical rank, grouped by shared
input as the forward pass runs them), and :class:`Calibration` answers per segment from that table. The timing
harness (:func:`median_ms`) is the one ``loadtests/bench_lora_ops.py`` uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

Bucket = tuple[int, int]  # (rows of the segment, distinct adapters among them)
# decode over distinct adapters (one row each), decode with shared adapters, prefill over few adapters
BUCKETS: tuple[Bucket, ...] = ((1, 1), (8, 8), (32, 32), (64, 64), (64, 8), (256, 4), (1024, 8))


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` after ``warmup`` calls, synchronising around each call on CUDA."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def nearest_bucket(buckets: Collection[Bucket], rows: int, groups: int) -> Bucket:
    """The bucket closest to ``(rows, groups)`` in log space (rows and rows per adapter are what kernels scale
    with); ties go to the first bucket."""

    def distance(bucket: Bucket) -> float:
        bucket_rows, bucket_groups = bucket
        return math.log(max(rows, 1) / bucket_rows) ** 2 + math.log(max(groups, 1) / bucket_groups) ** 2

    return min(buckets, key=distance)


@dataclass(frozen=True)
class LayerShape:
    """What a calibration times: one decoder layer's LoRA deltas at ``rank``, its linears grouped by the input they
    share (q/k/v, o, gate/up, down: the groups the forward pass projects together)."""

    rank: int
    projections: tuple[tuple[int, tuple[int, ...]], ...]  # (fan-in, the fan-outs of the linears sharing it)

    def describe(self) -> str:
        groups = ", ".join(f"{fan_in}->{'+'.join(map(str, outs))}" for fan_in, outs in self.projections)
        return f"rank {self.rank}, {groups}"


DEFAULT_LAYER = LayerShape(16, ((4096, (4096,)),))  # one 4096 -> 4096 linear: when no base's shape is given


@dataclass(frozen=True)
class Calibration:
    """Measured milliseconds per candidate kernel (by name) at each bucket; a kernel missing at a bucket could not
    run there (the window kernel needs one row per adapter)."""

    label: str  # what was measured: device, dtype, the layer's shape (rank, fan-in -> fan-outs)
    timings: Mapping[Bucket, Mapping[str, float]]
    _memo: dict[tuple[int, int, frozenset[str]], str] = field(default_factory=dict, compare=False, repr=False)

    def best(self, rows: int, groups: int, allowed: Collection[str]) -> str:
        """The fastest of ``allowed`` at the bucket nearest the segment; a kernel unmeasured there counts as
        slowest, and when none of ``allowed`` was measured there, the first of them in ``allowed``'s order."""
        key = (rows, groups, frozenset(allowed))
        found = self._memo.get(key)
        if found is None:
            row = self.timings[nearest_bucket(self.timings, rows, groups)]
            ordered = list(allowed)
            found = min(ordered, key=lambda name: (row.get(name, math.inf), ordered.index(name)))
            self._memo[key] = found
        return found

    def winners(self) -> dict[Bucket, str]:
        """The fastest measured kernel at every bucket."""
        return {bucket: min(row, key=row.__getitem__) for bucket, row in self.timings.items() if row}

    def describe(self) -> str:
        cells = []
        for bucket, row in self.timings.items():
            times = ", ".join(f"{name} {ms:.3f}" for name, ms in row.items())
            cells.append(f"{bucket[0]} rows/{bucket[1]} adapters: {times} ms")
        return f"calibrated on {self.label} ({'; '.join(cells)})"


# A candidate: given the bucket's rows and groups, the closure that runs its ``y += delta`` once, or None when it
# cannot serve that bucket.
Candidate = Callable[[int, int], Callable[[], object] | None]


def measure(
    label: str,
    device: torch.device,
    candidates: Mapping[str, Candidate],
    buckets: tuple[Bucket, ...] = BUCKETS,
    repeats: int = 10,
) -> Calibration:
    """Times every candidate at every bucket (median of ``repeats`` after warm-up)."""
    timings: dict[Bucket, dict[str, float]] = {}
    for rows, groups in buckets:
        row = timings[(rows, groups)] = {}
        for name, candidate in candidates.items():
            run = candidate(rows, groups)
            if run is not None:
                row[name] = median_ms(run, device, repeats)
    return Calibration(label, timings)
