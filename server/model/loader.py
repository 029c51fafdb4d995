"""Loading the base model once: resolve the source, pick device and dtype, optionally quantize.

``quantization``: ``none``, ``int8`` (LLM.int8), ``nf4`` (4-bit NormalFloat, compute in the model dtype), both
bitsandbytes, or ``fp8`` (float8 weights and per-token activations, :mod:`.fp8`). bitsandbytes quantizes while
loading from safetensors, so a GGUF source is converted first (see ``embedded``). Default: nf4 with bfloat16 compute
on CUDA (fp8 is not the default until measured against it on a GPU: loadtests/bench_quantized_base.py), none
(float32) on CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.server.config import ModelSettings
from loraplex.server.core.shape import TARGET_MODULES, ModelShape
from loraplex.server.model.embedded import resolve_model_dir
from loraplex.server.model.fingerprint import base_fingerprint
from loraplex.server.model.quantize import load_quantized

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedBase:
    """The base model and what the rest of the server needs to know about it."""

    model: Any  # a transformers *ForCausalLM, eval mode, no grads
    tokenizer: Any
    shape: ModelShape
    device: torch.device
    dtype: torch.dtype
    quantization: str
    name: str
    model_dir: Path
    fingerprint: str
    load_seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name} but no CUDA device is available; use cpu or auto")
    return device


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AVX512-BF16 or AMX-BF16 among its flags (oneDNN's own
    check also says yes for plain AVX-512, where it emulates bfloat16). False where ``cpuinfo`` cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


# What ``auto`` means for an unquantized base on a CPU with native bfloat16: chosen by loadtests/bench_server.py
# (BENCHMARKS.md: bfloat16 decodes the base 2.3-2.8x and 32 distinct adapters 1.2-2.4x faster than float32).
# tests/conftest.py pins it to float32, the precision the suite's PEFT comparisons (1e-3) hold at.
CPU_AUTO_DTYPE = torch.bfloat16


def resolve_dtype(name: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    """``auto``: bfloat16 on CUDA; on CPU :data:`CPU_AUTO_DTYPE` for an unquantized base where the CPU has native
    bfloat16, else float32 (emulated bfloat16 is slower than float32, and int8/nf4/fp8 keep their float32 path)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    return CPU_AUTO_DTYPE if quantization == "none" and cpu_has_native_bf16() else torch.float32


def load_base(settings: ModelSettings) -> LoadedBase:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    device = resolve_device(settings.device)
    quantization = settings.quantization or ("nf4" if device.type == "cuda" else "none")
    dtype = resolve_dtype(settings.dtype, device, quantization)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model_dir = resolve_model_dir(settings.base_model, settings.cache_dir)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    if quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        model = load_quantized(model_dir, quantization, dtype, device)
    model.eval()
    model.requires_grad_(False)
    layer = model.model.layers[0]
    missing = [m for m in TARGET_MODULES if not hasattr(layer.self_attn, m) and not hasattr(layer.mlp, m)]
    if missing:
        raise ValueError(f"base model layers lack {missing}; loraplex needs a Llama-style decoder")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fingerprint = base_fingerprint(shape, tokenizer, model.get_input_embeddings().weight)
    elapsed = time.monotonic() - started
    log.info("base model %s (%s, %s, %s) loaded in %.1f s", model_dir.name, device, dtype, quantization, elapsed)
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        shape=shape,
        device=device,
        dtype=dtype,
        quantization=quantization,
        name=settings.base_model if settings.base_model == "embedded" else model_dir.name,
        model_dir=model_dir,
        fingerprint=fingerprint,
        load_seconds=elapsed,
    )
