"""A random-weight Llama base built in memory on its device, as the engine's :class:`LoadedBase`: GPU benchmarks need
an 8B shape (16 GB in bfloat16) without writing its weights to disk or downloading anything.

Only the config and the synthetic tokenizer (:mod:`loadtests.random_model`) are written, to ``directory``; the
weights are drawn on ``device`` in ``dtype`` from ``seed``, so two processes with the same arguments build the same
base (same fingerprint: adapters written for one load on the other).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loadtests.random_model import PRESETS, _write_tokenizer
from loraplex.server.core.shape import ModelShape
from loraplex.server.model.fingerprint import base_fingerprint
from loraplex.server.model.loader import LoadedBase, resolve_device, resolve_dtype


def random_base(
    directory: Path, preset: str = "tiny", device: str = "auto", dtype: str = "auto", seed: int = 0
) -> LoadedBase:
    """An unquantized random base of ``preset`` on ``device`` (``auto``: CUDA if present) in ``dtype`` (``auto``:
    the loader's rule, bfloat16 on CUDA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    started = time.monotonic()
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **PRESETS[preset])
    config.save_pretrained(directory)
    _write_tokenizer(directory, config.vocab_size)
    torch.manual_seed(seed)
    with torch.device(where):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    shape = ModelShape.from_config(config)
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        shape=shape,
        device=where,
        dtype=torch_dtype,
        quantization="none",
        name=f"random-{preset}",
        model_dir=directory,
        fingerprint=base_fingerprint(shape, tokenizer, model.get_input_embeddings().weight),
        load_seconds=time.monotonic() - started,
    )
