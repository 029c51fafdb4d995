"""Dequantizing base layers (for DoRA norms): nf4 and int8 layers give back their weights within quantization error,
before and after the layer's first forward (bitsandbytes moves int8 scales at that point, and on an AVX512-BF16 CPU
re-lays an nf4 weight out for its fused kernel)."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnbf
import pytest
import torch

from loraplex.server.config import ModelSettings
from loraplex.server.model.loader import LoadedBase, load_base
from loraplex.server.model.quantize import dense_weight, keep_canonical_layout


def _relative_error(recovered: torch.Tensor, original: torch.Tensor) -> float:
    return float(torch.linalg.norm(recovered - original) / torch.linalg.norm(original))


@pytest.mark.parametrize(("quantization", "tolerance"), [("nf4", 0.15), ("int8", 0.02)])
def test_dense_weight_recovers_quantized_weights(
    base: LoadedBase, base_dir: str, quantization: str, tolerance: float
) -> None:
    quantized = load_base(ModelSettings(base_model=base_dir, quantization=quantization))  # type: ignore[arg-type]
    original = base.model.model.layers[3].self_attn.q_proj.weight.float()
    layer = quantized.model.model.layers[3].self_attn.q_proj
    before = dense_weight(layer)
    with torch.no_grad():
        layer(torch.randn(2, original.shape[1]))
    after = dense_weight(layer)
    for recovered in (before, after):
        assert recovered.shape == original.shape and recovered.dtype == torch.float32
        assert _relative_error(recovered, original) < tolerance
    torch.testing.assert_close(before, after)


def test_dense_weight_refuses_the_avx512_bf16_layout(base: LoadedBase, base_dir: str) -> None:
    """On an AVX512-BF16 CPU, bitsandbytes >= 0.49 re-lays an nf4 weight out at its first inference forward
    (``_convert_weight_packed_for_cpu``). That CPU is not always at hand, so the test applies the library's own
    conversion: the public dequantization of the new layout is garbage, and so is the library's inverse (absmax left
    transposed), so dense_weight refuses it with a message that says what to do."""
    quantized = load_base(ModelSettings(base_model=base_dir, quantization="nf4"))
    original = base.model.model.layers[3].self_attn.q_proj.weight.float()
    layer = quantized.model.model.layers[3].self_attn.q_proj
    weight = layer.weight
    weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    naive = bnbf.dequantize_4bit(weight.data, weight.quant_state).float().reshape(original.shape)
    assert _relative_error(naive, original) > 0.5  # what dense_weight returned under bitsandbytes 0.50 on such CPUs
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(weight.quant_state))
    assert _relative_error(bnbf.dequantize_4bit(data, state).float(), original) > 0.15
    with pytest.raises(ValueError, match="re-laid out for bitsandbytes' AVX512-BF16 kernel"):
        dense_weight(layer)


def test_nf4_layers_keep_the_canonical_layout(base_dir: str) -> None:
    """bitsandbytes re-lays nf4 layers out on AVX512-BF16 CPUs when ``support_avx512bf16_for_cpu`` is set; every
    base loaded through load_quantized has it cleared, and a layer switched on (as on such a CPU) is switched off."""
    quantized = load_base(ModelSettings(base_model=base_dir, quantization="nf4"))
    layers = [m for m in quantized.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 7 * quantized.shape.num_layers
    assert not any(m.support_avx512bf16_for_cpu for m in layers)  # whatever this CPU supports
    for module in layers[:5]:  # as bitsandbytes sets it on an AVX512-BF16 CPU
        module.support_avx512bf16_for_cpu = True
    assert keep_canonical_layout(quantized.model) == 5
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        layers[0](torch.randn(3, layers[0].in_features))
    assert not getattr(layers[0].weight.quant_state, "packing_format_for_cpu", False)
