"""LoRA-aware linear layers: a base linear (float, int8 or nf4) plus the batched deltas of the step's pools.

The base module runs once over all rows; each pool segment whose pool targets this module adds its delta to its
row range through the kernel :class:`LoraKernels` picks for that segment's shape. The slot stacks may hold another
dtype than the base (float32 LoRA on a bfloat16 base on CPU without the fused kernel): the rows are cast to it and
the delta added back. The fused kernel returns the segment's output rows itself (base output plus delta); the
Triton kernels add the delta into the output's rows in place (into zeros for DoRA, which needs the delta alone).
No probing of module types on the hot path: the wrapper knows its layer index, module name and bias at
construction.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import (
    LoraBackend,
    LoraKernels,
    apply_dora,
    lora_add_fused,
    lora_add_triton,
    lora_delta,
)


class LoraLinear:
    """``y = base(x)``, then for every pool segment targeting this module ``y[rows] += delta(x[rows])``."""

    def __init__(self, base: nn.Module, layer: int, module: str, kernels: LoraKernels) -> None:
        self.base = base
        self.layer = layer
        self.module = module
        self._kernels = kernels
        bias = getattr(base, "bias", None)
        self.bias: torch.Tensor | None = bias if isinstance(bias, torch.Tensor) else None

    def __call__(self, x: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        for segment in mapping.segments:
            pool = segment.pool
            stacks_a = pool.a.get(self.module)
            if stacks_a is None:
                continue
            rows = slice(segment.start, segment.end)
            dora = pool.key.dora
            backend = self._kernels.choose(
                segment.end - segment.start, segment.groups, segment.window, dora, segment.padded
            )
            a, b = stacks_a[self.layer], pool.b[self.module][self.layer]
            if backend is LoraBackend.FUSED and segment.window is not None and segment.window_offsets is not None:
                y[rows] = lora_add_fused(y[rows], x[rows], a, b, segment.window, segment.window_offsets)
                continue
            if backend is LoraBackend.TRITON and not dora:  # adds into y's rows in place (a view)
                lora_add_triton(y[rows], x[rows], a, b, segment.group_ends, segment.groups)
                continue
            if backend is LoraBackend.TRITON:
                delta = y.new_zeros((segment.end - segment.start, y.shape[1]), dtype=a.dtype)
                lora_add_triton(delta, x[rows], a, b, segment.group_ends, segment.groups)
            else:
                xs = x[rows].to(a.dtype)
                delta = lora_delta(backend, xs, a, b, segment.slots, segment.group_ends, segment.window, segment.padded)
            if dora:
                scale = pool.dora[self.module][self.layer].index_select(0, segment.slots)
                y[rows] = apply_dora(y[rows], delta, self.bias, scale)
            else:
                y[rows] += delta
        return y
