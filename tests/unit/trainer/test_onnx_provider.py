"""Which onnxruntime provider validates an ONNX export (trainer/export.py), against this machine's real
onnxruntime: CUDA where onnxruntime-gpu offers it, else CPU; CUDA asked for and absent is a clear error."""

from __future__ import annotations

import pytest

from loraplex.trainer.errors import ConfigError
from loraplex.trainer.export import CPU_PROVIDER, CUDA_PROVIDER, onnx_providers

onnxruntime = pytest.importorskip("onnxruntime")


def test_auto_picks_cuda_only_where_onnxruntime_has_it() -> None:
    available = onnxruntime.get_available_providers()
    want = [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]
    assert onnx_providers("auto", available) == want
    assert onnx_providers("cpu", available) == [CPU_PROVIDER]


def test_cuda_asked_for_without_onnxruntime_gpu_names_the_fix() -> None:
    available = onnxruntime.get_available_providers()
    if CUDA_PROVIDER in available:
        assert onnx_providers("cuda", available) == [CUDA_PROVIDER, CPU_PROVIDER]
        return
    with pytest.raises(ConfigError, match=r"onnxruntime-gpu.*loraplex\[gpu\]") as raised:
        onnx_providers("cuda", available)
    assert CPU_PROVIDER in str(raised.value)  # says what this onnxruntime offers


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        onnx_providers("tensorrt", [CPU_PROVIDER])
