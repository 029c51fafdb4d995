"""ONNX export validated on onnxruntime-gpu's CUDA provider (run with ``-m gpu`` on a CUDA machine with the gpu
extra): the exported random-weight model's logits against torch's, within the export's tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loadtests.random_model import write_random_llama
from loraplex.trainer.export import CUDA_PROVIDER, ONNX_FILE, ONNX_TOLERANCE, export_onnx

onnxruntime = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        CUDA_PROVIDER not in onnxruntime.get_available_providers(), reason="needs onnxruntime-gpu's CUDA provider"
    ),
]


def test_export_validates_on_the_cuda_provider(tmp_path: Path) -> None:
    model_dir = write_random_llama(tmp_path / "model", "tiny", torch.float32, seed=2)
    worst = export_onnx(model_dir, model_dir / ONNX_FILE, provider="cuda")
    print(f"CUDA provider: max abs logit difference vs torch {worst:.3e}")
    assert (model_dir / ONNX_FILE).is_file()
    assert worst <= ONNX_TOLERANCE
