"""Dequantizing base layers (for DoRA norms): nf4 and int8 layers give back their weights within quantization error,
before and after the layer's first forward (bitsandbytes moves int8 scales at that point)."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.config import ModelSettings
from loraplex.server.model.dora import dense_weight
from loraplex.server.model.loader import LoadedBase, load_base


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
        relative = torch.linalg.norm(recovered - original) / torch.linalg.norm(original)
        assert relative < tolerance, relative
    torch.testing.assert_close(before, after)
