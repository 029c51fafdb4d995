"""LoRA-aware linear layers: a base linear (float, int8 or nf4) plus the batched deltas of the step's pools.

The base module runs once over all rows; each pool segment whose pool targets this module adds its delta to its
row range through the kernel :class:`LoraKernels` picks for that segment's shape. The slot stacks may hold another
dtype than the base (float32 LoRA on a bfloat16 base on CPU without the fused kernel): the rows are cast to it and
the delta added back. The fused kernel returns the segment's output rows itself (base output plus delta); the
Triton kernels add the delta into the output's rows in place (into zeros for DoRA, which needs the delta alone).
No probing of module types on the hot path: the wrapper knows its layer index, module name and bias at
construction.

The forward pass runs the linears of a layer that share their input together, as a :class:`LoraProjection`
(:data:`PROJECTIONS`: q/k/v, o, gate/up, down): where a segment's kernel is Triton, one multi-slice shrink and one
expand launch serve all of the projection's modules that the segment's pool targets (a pool of q,v adapters passes
two slices, k adds nothing); the other kernels (every CPU kernel) run module by module, the same calls in the same
order per module as before the merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.calibration import LayerShape
from loraplex.server.lora.mapping import LoraMapping, LoraSegment
from loraplex.server.lora.ops import (
    LoraBackend,
    LoraKernels,
    apply_dora,
    lora_add_fused,
    lora_add_rows_slices,
    lora_add_triton_slices,
    lora_delta,
)
from loraplex.server.lora.pool import SlotPool

# the targetable linears of a decoder layer grouped by the input they share, in the order the forward pass runs them
PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)


def layer_shape(shape: ModelShape, rank: int) -> LayerShape:
    """One decoder layer of ``shape`` at ``rank``, grouped as :data:`PROJECTIONS` (what the calibration times)."""
    return LayerShape(
        rank,
        tuple(
            (shape.module_dims(group[0])[0], tuple(shape.module_dims(module)[1] for module in group))
            for group in PROJECTIONS
        ),
    )


def _backend(kernels: LoraKernels, segment: LoraSegment) -> LoraBackend:
    return kernels.choose(
        segment.end - segment.start, segment.groups, segment.window, segment.pool.key.dora, segment.padded
    )


class LoraLinear:
    """One targetable linear of a layer: its base module and how a segment's delta is added into its output."""

    def __init__(self, base: nn.Module, layer: int, module: str) -> None:
        self.base = base
        self.layer = layer
        self.module = module
        bias = getattr(base, "bias", None)
        self.bias: torch.Tensor | None = bias if isinstance(bias, torch.Tensor) else None

    def add_segment(self, y: torch.Tensor, x: torch.Tensor, segment: LoraSegment, backend: LoraBackend) -> None:
        """Adds the segment's delta into ``y``'s rows by ``backend``, any kernel but Triton (which the projection
        runs for all its modules at once); nothing where the segment's pool skips this module."""
        pool = segment.pool
        stacks_a = pool.a.get(self.module)
        if stacks_a is None:
            return
        rows = slice(segment.start, segment.end)
        a, b = stacks_a[self.layer], pool.b[self.module][self.layer]
        if backend is LoraBackend.FUSED and segment.window is not None and segment.window_offsets is not None:
            y[rows] = lora_add_fused(y[rows], x[rows], a, b, segment.window, segment.window_offsets)
        else:
            xs = x[rows].to(a.dtype)
            delta = lora_delta(backend, xs, a, b, segment.slots, segment.group_ends, segment.window, segment.padded)
            self.add_delta(y, delta, segment)

    def add_delta(self, y: torch.Tensor, delta: torch.Tensor, segment: LoraSegment) -> None:
        """``y[rows] += delta`` for the segment's rows, through the pool's DoRA scale where it has one."""
        rows = slice(segment.start, segment.end)
        pool = segment.pool
        if pool.key.dora:
            scale = pool.dora[self.module][self.layer].index_select(0, segment.slots)
            y[rows] = apply_dora(y[rows], delta, self.bias, scale)
        else:
            y[rows] += delta


class LoraProjection:
    """Linears of one layer that share their input (:data:`PROJECTIONS`, or one alone): ``ys[i] = base_i(x)``, then
    for every pool segment ``ys[i][rows] += delta_i(x[rows])`` for the modules its pool targets, merged across the
    modules where the segment's kernel is Triton."""

    def __init__(self, linears: Sequence[LoraLinear], kernels: LoraKernels) -> None:
        self.linears = tuple(linears)
        self.layer = self.linears[0].layer
        self._kernels = kernels

    def _targeted(self, pool: SlotPool) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """The positions of the linears ``pool`` targets, and their A and B stacks of this layer."""
        present = [i for i, linear in enumerate(self.linears) if linear.module in pool.a]
        a = [pool.a[self.linears[i].module][self.layer] for i in present]
        b = [pool.b[self.linears[i].module][self.layer] for i in present]
        return present, a, b

    def __call__(self, x: torch.Tensor, mapping: LoraMapping) -> list[torch.Tensor]:
        """Module by module (the base output, then its deltas by the per-module kernels while it is fresh), then the
        segments of the Triton kernel for all modules at once."""
        backends = [_backend(self._kernels, segment) for segment in mapping.segments]
        ys: list[torch.Tensor] = []
        for linear in self.linears:
            y: torch.Tensor = linear.base(x)
            for segment, backend in zip(mapping.segments, backends, strict=True):
                if backend is not LoraBackend.TRITON:
                    linear.add_segment(y, x, segment, backend)
            ys.append(y)
        for segment, backend in zip(mapping.segments, backends, strict=True):
            if backend is LoraBackend.TRITON:
                self.add_triton(ys, x, segment)
        return ys

    def add_triton(self, ys: list[torch.Tensor], x: torch.Tensor, segment: LoraSegment) -> None:
        """The segment's deltas of every targeted module by one multi-slice shrink and one expand launch, added into
        the outputs' rows in place (DoRA: into zeros, then through its scale)."""
        present, a, b = self._targeted(segment.pool)
        if not present:
            return
        rows = slice(segment.start, segment.end)
        if not segment.pool.key.dora:
            targets = [ys[i][rows] for i in present]  # views: the kernels add into ys
            lora_add_triton_slices(targets, x[rows], a, b, segment.group_ends, segment.groups)
            return
        deltas = [ys[i].new_zeros((segment.end - segment.start, ys[i].shape[1]), dtype=a[0].dtype) for i in present]
        lora_add_triton_slices(deltas, x[rows], a, b, segment.group_ends, segment.groups)
        for i, delta in zip(present, deltas, strict=True):
            self.linears[i].add_delta(ys[i], delta, segment)

    def rows(self, x: torch.Tensor, lora: Sequence[tuple[SlotPool, torch.Tensor]]) -> list[torch.Tensor]:
        """The static-shape form (a decode step for CUDA graphs): per pool ``(pool, row_slots [T])`` (``-1`` = the
        row has no adapter of that pool), every targeted module's delta through :func:`lora_add_rows_slices` (one
        device sort and one shrink and expand launch for the projection where the Triton kernels run). No DoRA."""
        ys: list[torch.Tensor] = [linear.base(x) for linear in self.linears]
        for pool, row_slots in lora:
            present, a, b = self._targeted(pool)
            if present:
                lora_add_rows_slices([ys[i] for i in present], x, a, b, row_slots)
        return ys
