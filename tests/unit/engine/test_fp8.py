"""fp8 weights (server/model/fp8.py) on CPU: quantization error, the reference path against ``torch._scaled_mm``
(the CUDA path's call, run on CPU), batch independence, the device checks and the in-place model conversion."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loadtests.random_model import write_random_llama
from loraplex.server.core.shape import TARGET_MODULES
from loraplex.server.model.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    check_fp8_device,
    fp8_capability_error,
    quantize_fp8,
    quantize_per_row,
)
from loraplex.server.model.quantize import dense_weight, load_quantized


def _linear(fan_in: int = 256, fan_out: int = 128, seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():  # channels of very different magnitudes: one shared scale would flatten the small ones
        linear.weight.mul_(torch.logspace(-3, 1, fan_out).unsqueeze(1))
    return linear


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want.double()) / torch.linalg.norm(want.double()))


def test_per_row_quantization_keeps_e4m3_precision_in_every_channel() -> None:
    weight = _linear().weight.detach()
    qweight, scale = quantize_per_row(weight)
    assert qweight.dtype == FP8_DTYPE and scale.shape == (weight.shape[0], 1)
    dequantized = qweight.float() * scale
    # e4m3 keeps 3 mantissa bits: at most 2^-4 relative error for normal values, in the smallest channel too.
    per_channel = (dequantized - weight).norm(dim=1) / weight.norm(dim=1)
    assert float(per_channel.max()) < 2**-4
    assert float(qweight.float().abs().amax(dim=1).min()) == 448.0  # every channel uses the full range


def test_reference_path_is_scaled_mm_arithmetic() -> None:
    """The CPU reference and torch._scaled_mm (called as on CUDA) agree to float32 rounding, and both are within
    fp8 precision of the float layer."""
    linear = _linear(bias=True)
    x = torch.randn(3, 5, 256) * torch.logspace(-2, 2, 5).unsqueeze(1)  # tokens of very different magnitudes
    reference = Fp8Linear(linear, torch.float32, scaled_mm=False)
    scaled = Fp8Linear(linear, torch.float32, scaled_mm=True)
    with torch.no_grad():
        want = linear(x)
        got = reference(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert _relative(scaled(x), got) < 1e-6
        assert _relative(got, want) < 0.05
        for token in range(5):  # per-token scales: a small token keeps its precision beside a large one
            assert _relative(got[:, token], want[:, token]) < 0.05
        bf16 = Fp8Linear(linear, torch.bfloat16, scaled_mm=True)  # CUDA's out dtype
        assert bf16(x.bfloat16()).dtype == torch.bfloat16
        assert _relative(bf16(x.bfloat16()), got) < 1e-2


def test_rows_are_independent_of_their_batch() -> None:
    layer = Fp8Linear(_linear(), torch.float32, scaled_mm=False)
    x = torch.randn(4, 256)
    batch = torch.cat([x[:1], 1000 * x[1:]])
    assert torch.equal(quantize_per_row(x[:1])[0][0], quantize_per_row(batch)[0][0])  # the same fp8 row
    with torch.no_grad():  # the same up to float32 matmul rounding (GEMV vs GEMM accumulation order)
        assert _relative(layer(x[:1])[0], layer(batch)[0]) < 1e-6


def test_weight_is_the_dequantized_weight_peft_and_dora_read() -> None:
    linear = _linear()
    layer = Fp8Linear(linear, torch.float32, scaled_mm=False)
    assert isinstance(layer, nn.Linear)  # PEFT wraps it as a Linear
    assert layer.weight.dtype == torch.float32 and layer.weight.shape == linear.weight.shape
    assert torch.equal(dense_weight(layer), layer.weight)
    assert _relative(layer.weight, linear.weight.detach()) < 2**-4
    assert not list(layer.parameters())  # no float copy of the weight kept


def test_device_checks() -> None:
    check_fp8_device(torch.device("cpu"))  # the reference path: no requirement
    message = fp8_capability_error((8, 0))
    assert "8.9" in message and "8.0" in message and "nf4" in message


def test_quantized_model_replaces_decoder_projections_only(tmp_path: Path) -> None:
    base_dir = write_random_llama(tmp_path / "base", "tiny", torch.float32, seed=3)
    model = load_quantized(base_dir, "fp8", torch.float32, torch.device("cpu"))
    layers = model.model.layers
    for layer in layers:
        for name in TARGET_MODULES:
            block = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            module = getattr(block, name)
            assert isinstance(module, Fp8Linear) and not module.scaled_mm, name
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    with torch.no_grad():
        # 28 fp8 matmuls in a row on a random model: measured 0.09
        assert _relative(model(input_ids=ids).logits, reference(input_ids=ids).logits) < 0.15


def test_quantize_fp8_counts_the_projections(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config)
    assert quantize_fp8(model, torch.float32, torch.device("cpu")) == 2 * len(TARGET_MODULES)
