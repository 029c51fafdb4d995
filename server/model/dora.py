"""DoRA at load time: per-output-row magnitude scales computed once from the base weights.

PEFT's DoRA layer output is ``bias + g ⊙ (W x + s·B A x)`` with ``g = m / ||W + s·B A||`` (row norms, treated as a
constant). Weights are immutable once loaded, so ``g`` is computed here once per adapter and stored in its slot;
serving then costs one elementwise scale. Quantized bases are dequantized for the norm, as PEFT does.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.server.lora.format import AdapterWeights, module_block
from loraplex.server.lora.pool import DoraScales
from loraplex.server.model.loader import LoadedBase


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of a plain, int8 or nf4 linear layer."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        dense: torch.Tensor = bnbf.dequantize_4bit(weight.data, quant_state)
        return dense.float()
    if weight.dtype == torch.int8:  # bitsandbytes Int8Params: LLM.int8 row-wise scales
        # The scales live on the weight until the layer's first forward, then bitsandbytes moves them to its state.
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if not isinstance(scb, torch.Tensor):
            raise ValueError("int8 layer has no quantization scales (SCB); cannot dequantize it")
        scales = scb.float().unsqueeze(1) / 127.0
        return weight.data.float() * scales
    return weight.detach().float()


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
