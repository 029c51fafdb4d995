"""fp8 weights: per-output-channel scaled float8_e4m3fn linear layers with dynamic per-token activation scales.

``W ≈ diag(s_w) · Q_w`` with ``s_w = max|W_row| / 448`` (e4m3's largest finite value) per output channel, and at
every call ``x ≈ diag(s_x) · Q_x`` with one scale per token (row), so ``y = diag(s_x) (Q_x Q_wᵀ) diag(s_w)``: one
float8 × float8 product accumulated in float32, scaled per row and column. On CUDA devices of compute capability
8.9 or newer (Ada, Hopper) the product is ``torch._scaled_mm``'s (row-wise scales, bfloat16 out); elsewhere the
reference path casts both float8 operands to float32, multiplies and scales: the same arithmetic, so CPU tests check
the numerics the GPU runs (``torch._scaled_mm`` on CPU agrees with it to float32 rounding, see tests/unit/engine/
test_fp8.py). Per-token scales keep each row's numerics independent of the batch it is in.

The decoder layers' projections (``TARGET_MODULES``) are replaced in place by :class:`Fp8Linear`; the embeddings,
norms and ``lm_head`` keep the model dtype, as bitsandbytes leaves ``lm_head`` unquantized. :class:`Fp8Linear` is an
``nn.Linear`` to PEFT, with ``compute_dtype`` (the dtype PEFT gives its LoRA layers) and a dequantized ``weight``
(what DoRA norms and :func:`loraplex.server.model.quantize.dense_weight` read), so the PEFT oracle wraps the same
quantized base the engine serves.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.server.core.shape import ATTENTION_MODULES, MLP_MODULES

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
_SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm on CUDA: both dimensions of the weight a multiple of 16
_MIN_SCALE = 1e-12  # an all-zero row or channel quantizes to zeros instead of dividing by zero


def check_fp8_device(device: torch.device) -> None:
    """Raises ValueError for a CUDA device below compute capability 8.9 (no float8 matmul); a CPU runs the
    reference path."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(fp8_capability_error(capability))


def fp8_capability_error(capability: tuple[int, int]) -> str:
    major, minor = capability
    return (
        f"model.quantization=fp8 needs a CUDA device of compute capability 8.9 or newer (Ada, Hopper) for "
        f"torch._scaled_mm; this device is {major}.{minor}: use model.quantization=nf4 or int8 there"
    )


def quantize_per_row(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, s)`` with ``values ≈ Q * s``: float8_e4m3fn ``Q`` of ``values``' shape, float32 scales ``[rows, 1]``
    (one per row of the last dimension, its largest magnitude mapped to 448)."""
    wide = values.float()
    scale = (wide.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Fp8Linear(nn.Linear):
    """A linear layer holding float8_e4m3fn weights ``[out, in]`` and their float32 per-channel scales."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, scaled_mm: bool) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: no float weight is allocated
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = compute_dtype
        self.scaled_mm = scaled_mm
        with torch.no_grad():
            qweight, scale = quantize_per_row(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, out], as _scaled_mm's scale_b
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized ``[out, in]`` weight in the compute dtype (computed on every access: for DoRA norms and
        PEFT's dtype and device probes, never for the forward)."""
        qweight, scale = self.qweight, self.weight_scale
        assert isinstance(qweight, torch.Tensor) and isinstance(scale, torch.Tensor)
        return (qweight.float() * scale.reshape(-1, 1)).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight, scale_w = self.qweight, self.weight_scale
        assert isinstance(qweight, torch.Tensor) and isinstance(scale_w, torch.Tensor)
        rows = x.reshape(-1, self.in_features)
        qx, scale_x = quantize_per_row(rows)
        if self.scaled_mm:
            y = torch._scaled_mm(qx, qweight.t(), scale_a=scale_x, scale_b=scale_w, out_dtype=self.compute_dtype)
        else:
            y = ((qx.float() @ qweight.float().t()) * scale_x * scale_w).to(self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_fp8(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replaces every decoder layer's projections of a transformers Llama-style ``model`` (already on ``device``)
    by :class:`Fp8Linear`; returns how many were replaced. ``torch._scaled_mm`` where ``device`` is CUDA."""
    check_fp8_device(device)
    scaled_mm = device.type == "cuda"
    if scaled_mm and compute_dtype != torch.bfloat16:
        raise ValueError(
            f"model.quantization=fp8 on CUDA computes in bfloat16 (torch._scaled_mm's row-wise scales); "
            f"model.dtype is {str(compute_dtype).removeprefix('torch.')}: set it to bfloat16 or auto"
        )
    replaced = 0
    for layer in model.model.layers:  # type: ignore[union-attr]
        for block, names in ((layer.self_attn, ATTENTION_MODULES), (layer.mlp, MLP_MODULES)):
            for name in names:
                linear = getattr(block, name)
                if scaled_mm and (
                    linear.in_features % _SCALED_MM_ALIGNMENT or linear.out_features % _SCALED_MM_ALIGNMENT
                ):
                    raise ValueError(
                        f"model.quantization=fp8: {name} is {linear.out_features}x{linear.in_features}; "
                        f"torch._scaled_mm needs both a multiple of {_SCALED_MM_ALIGNMENT}"
                    )
                setattr(block, name, Fp8Linear(linear, compute_dtype, scaled_mm))
                replaced += 1
    return replaced
