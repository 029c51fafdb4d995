"""Quantized bases: loading an nf4 or int8 model (bitsandbytes) or an fp8 one (:mod:`.fp8`), and dense weights.

One loading path (:func:`load_quantized`) serves the server, the trainer and the PEFT oracle, so every side computes
with the same layers the same way.

bitsandbytes 0.49+ changes an nf4 layer on a CPU with AVX512-BF16 at its first inference forward (eval mode, no
grad): it re-lays the packed weight out for its fused kernel (``_convert_weight_packed_for_cpu``: a ``[N, K/2]``
layout, absmax transposed and rounded to bfloat16, ``quant_state.packing_format_for_cpu = True``) and from then on
computes in bfloat16, whatever ``bnb_4bit_compute_dtype`` says. On such CPUs, under bitsandbytes 0.50:

- ``dequantize_4bit(weight.data, quant_state)``, the public dequantization PEFT uses too, reads the re-laid weight
  wrongly (relative error ~1.4), and the library's own inverse (``_convert_weight_packed_for_cpu_inverse``) restores
  the nibbles but leaves a non-nested absmax transposed (relative error ~0.2), so there is no sound way back;
- the layer's numerics become bfloat16 and depend on the batch's row count (its tiled kernel), so a float32 base is
  no longer float32 and a batched engine no longer matches a one-sequence reference.

:func:`load_quantized` therefore keeps every nf4 layer in the canonical layout (the layer's own
``support_avx512bf16_for_cpu`` switch, cleared): dequantization stays the public ``dequantize_4bit`` and compute
follows ``bnb_4bit_compute_dtype``. :func:`dense_weight` refuses a re-laid weight rather than return garbage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplex.server.model.fp8 import check_fp8_device, quantize_fp8

# bitsandbytes logs on every int8 matmul with float32 inputs that they are cast to float16, and, on AVX512-BF16
# CPUs, at import that it cannot fetch its optional fused kernel from a hub (it falls back to its bundled one).
_NOISY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def quiet_bitsandbytes() -> None:
    """Silences bitsandbytes' per-call and import-time warnings (see ``_NOISY_LOGGERS``)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    """The transformers ``BitsAndBytesConfig`` for ``nf4`` (compute in ``dtype``) or ``int8``; None for ``none``."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_quantized(model_dir: Path | str, quantization: str, dtype: torch.dtype, device: torch.device) -> Any:
    """A transformers ``*ForCausalLM`` quantized while loading, its nf4 layers in the canonical layout computing in
    ``dtype``; for ``fp8`` loaded in ``dtype`` on ``device``, then its decoder projections quantized in place."""
    from transformers import AutoModelForCausalLM

    if quantization == "fp8":
        check_fp8_device(device)  # before reading the weights
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        quantize_fp8(model, dtype, device)
        return model
    quiet_bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        quantization_config=quantization_config(quantization, dtype),
        device_map={"": device},
    )
    keep_canonical_layout(model)
    return model


def keep_canonical_layout(model: nn.Module) -> int:
    """Keeps every nf4 layer of ``model`` in bitsandbytes' canonical layout, computing in its compute dtype (no
    AVX512-BF16 re-layout, see the module docstring). Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            layer: Any = module  # a bitsandbytes Linear4bit
            layer.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of a plain, int8, nf4 or fp8 linear layer, as the layer computes with it (an
    fp8 layer's ``weight`` is its dequantized weight)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        return _dense_4bit(weight.data, quant_state)
    if weight.dtype == torch.int8:  # bitsandbytes Int8Params: LLM.int8 row-wise scales
        import bitsandbytes.functional as bnbf

        # The scales live on the weight until the layer's first forward, then bitsandbytes moves them to its state.
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if not isinstance(scb, torch.Tensor):
            raise ValueError("int8 layer has no quantization scales (SCB); cannot dequantize it")
        dense: torch.Tensor = bnbf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
        return dense.float()
    return weight.detach().float()


def _dense_4bit(data: torch.Tensor, quant_state: Any) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "nf4 layer was re-laid out for bitsandbytes' AVX512-BF16 kernel and cannot be dequantized; load the base "
            "through loraplex.server.model.quantize.load_quantized, which keeps the canonical layout"
        )
    dense: torch.Tensor = bnbf.dequantize_4bit(data, quant_state)
    return dense.float()
