"""DoRA at load time: per-output-row magnitude scales computed once from the base weights.

PEFT's DoRA layer output is ``bias + g ⊙ (W x + s·B A x)`` with ``g = m / ||W + s·B A||`` (row norms, treated as a
constant). Weights are immutable once loaded, so ``g`` is computed here once per adapter and stored in its slot;
serving then costs one elementwise scale. Quantized bases are dequantized for the norm
(``quantize.dense_weight``), as PEFT does.
"""

from __future__ import annotations

import torch

from loraplex.server.lora.format import AdapterWeights, module_block
from loraplex.server.lora.pool import DoraScales
from loraplex.server.model.loader import LoadedBase
from loraplex.server.model.quantize import dense_weight


def dora_scales_for(base: LoadedBase, weights: AdapterWeights) -> DoraScales | None:
    """``g`` per (layer, module) of a DoRA adapter; None for a plain LoRA adapter."""
    if not weights.use_dora:
        return None
    layers = base.model.model.layers
    scales: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        for (layer, module), lora in weights.modules.items():
            assert lora.magnitude is not None
            linear = getattr(getattr(layers[layer], module_block(module)), module)
            dense = dense_weight(linear)
            merged = dense + (lora.b.to(dense.device) @ lora.a.to(dense.device))
            norm = torch.linalg.norm(merged, dim=1)
            scales[(layer, module)] = (lora.magnitude.to(dense.device) / norm).cpu()
    return scales
