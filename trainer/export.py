"""Export: the adapter merged into its base as an HF model, and that model as ONNX checked against torch.

Merging happens into the float base, also for qlora adapters (merging into a 4-bit base would re-quantize it and
lose the adapter's precision); serve adapters unmerged, export merged models for other runtimes. The ONNX graph
(torch's dynamo exporter, needs ``onnx`` and ``onnxscript``) takes ``input_ids`` and ``attention_mask`` with
dynamic batch and sequence axes and returns ``logits``; onnxruntime then runs it beside torch and the largest
absolute logit difference over real (unpadded) tokens must stay within :data:`ONNX_TOLERANCE`. The check runs on
onnxruntime-gpu's CUDA execution provider where it is installed (the ``gpu`` extra), else on the CPU provider
(:func:`onnx_providers`; ``--provider cuda`` insists on CUDA and fails clearly without it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from loraplex.trainer.config import TrainConfig
from loraplex.trainer.errors import ConfigError
from loraplex.trainer.model import load_trained

ONNX_TOLERANCE = 1e-3
ONNX_FILE = "model.onnx"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")

log = logging.getLogger(__name__)


def merge(adapter_dir: Path, config: TrainConfig, output_dir: Path) -> Path:
    """Writes the base with the adapter merged in (float32 safetensors) and its tokenizer to ``output_dir``."""
    if config.method == "qlora":
        log.info("qlora adapter: merging into the float base (a 4-bit merge would re-quantize the weights)")
    peft_model, tokenizer = load_trained(adapter_dir, config, torch.device("cpu"), quantize=False)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits


def _check_inputs(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    checks = []
    for batch, length in ((1, 5), (3, 17)):
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, : length // 3] = 0  # left padding in the first row
        checks.append((ids, mask))
    return checks


def onnx_providers(provider: str, available: list[str]) -> list[str]:
    """The onnxruntime providers that validate the export: ``cuda`` (CUDA, CPU as onnxruntime's fallback for
    unsupported nodes), ``cpu``, or ``auto`` (CUDA where ``available`` has it, else CPU)."""
    if provider not in PROVIDERS:
        raise ConfigError(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if provider == "cuda" and CUDA_PROVIDER not in available:
        raise ConfigError(
            f"--provider cuda needs onnxruntime-gpu's {CUDA_PROVIDER}, which this onnxruntime lacks (it offers "
            f"{', '.join(available)}): install the gpu extra, pip install 'loraplex[gpu]', on a CUDA machine"
        )
    if provider == "cuda" or (provider == "auto" and CUDA_PROVIDER in available):
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def export_onnx(merged_dir: Path, path: Path, provider: str = "auto") -> float:
    """Exports the merged model to ONNX at ``path``; returns the max abs logit difference against torch, run on the
    providers :func:`onnx_providers` picks for ``provider``."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("ONNX export needs the export extra: pip install 'loraplex[export]'") from exc
    providers = onnx_providers(provider, onnxruntime.get_available_providers())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    wrapper = _LogitsOnly(model)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    sample = _check_inputs(model.config.vocab_size)[1]
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            sample,
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            dynamo=True,
            external_data=True,
        )
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    log.info("validating %s on %s", path, session.get_providers()[0])
    worst = 0.0
    for ids, mask in _check_inputs(model.config.vocab_size):
        with torch.no_grad():
            expected = wrapper(ids, mask)
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        real = mask.bool()
        worst = max(worst, float((torch.from_numpy(got)[real] - expected[real]).abs().max()))
    if worst > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX logits differ from torch by {worst:.2e} (> {ONNX_TOLERANCE}); do not use {path}")
    return worst
