"""The base model for training and its LoRA wrapping: lora, qlora (nf4 base), dora, rslora.

The base is resolved like the server resolves it (``embedded``, an HF directory or a .gguf, converted once), so
the adapter's base fingerprint is the one the server computes. ``qlora`` quantizes the base to 4-bit nf4 with
bitsandbytes while loading from safetensors (CPU or CUDA); LoRA weights stay float32 in every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.server.config import default_cache_dir
from loraplex.server.core.shape import ModelShape, UnsupportedModel
from loraplex.server.lora.format import module_block
from loraplex.server.model.embedded import BaseModelNotFound, resolve_model_dir
from loraplex.server.model.fingerprint import base_fingerprint
from loraplex.server.model.quantize import load_quantized
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.errors import ConfigError


@dataclass
class TrainingBase:
    """A base model wrapped for LoRA training, and what the trainer records about it."""

    model: Any  # peft.PeftModel around a *ForCausalLM
    tokenizer: Any
    shape: ModelShape
    fingerprint: str
    model_dir: Path
    device: torch.device


def resolve_base(config: TrainConfig) -> tuple[Path, Any, ModelShape]:
    """(model dir, tokenizer, shape) of the configured base; :class:`ConfigError` if it cannot be used."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        model_dir = resolve_model_dir(config.base_model, default_cache_dir())
        shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (BaseModelNotFound, UnsupportedModel, OSError, ValueError) as exc:
        raise ConfigError(f"cannot load base_model '{config.base_model}': {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"base_model '{config.base_model}': its tokenizer has no EOS token to end completions")
    return model_dir, tokenizer, shape


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass, or None for full float32."""
    choice = config.mixed_precision
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.modules),
        use_dora=config.method == "dora",
        use_rslora=config.method == "rslora",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _load_causal_lm(
    config: TrainConfig, model_dir: Path, device: torch.device, dtype: torch.dtype, quantize: bool
) -> Any:
    """The base ``*ForCausalLM`` on ``device``: nf4-quantized for qlora when ``quantize``, else in ``dtype``."""
    from transformers import AutoModelForCausalLM

    quantized = quantize and config.method == "qlora"
    try:
        if quantized:
            return load_quantized(model_dir, "nf4", dtype, device)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ConfigError(f"cannot load base_model '{config.base_model}' ({model_dir}): {exc}") from exc
    return model.to(device)


def load_training_base(
    config: TrainConfig, model_dir: Path, tokenizer: Any, shape: ModelShape, device: torch.device
) -> TrainingBase:
    """Loads the base (quantized for qlora), checks the targets exist, and wraps it in a fresh LoRA adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = _load_causal_lm(config, model_dir, device, autocast_dtype(config, device) or torch.float32, quantize=True)
    layer = model.model.layers[0]
    missing = [m for m in config.modules if not hasattr(getattr(layer, module_block(m), None), m)]
    if missing:
        raise ConfigError(f"target module(s) {missing} do not exist in base_model '{config.base_model}'")
    fingerprint = base_fingerprint(shape, tokenizer, model.get_input_embeddings().weight)
    model.config.use_cache = False
    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config(config))
    return TrainingBase(peft_model, tokenizer, shape, fingerprint, model_dir, device)


def load_trained(
    adapter_dir: Path, config: TrainConfig, device: torch.device, quantize: bool = True
) -> tuple[Any, Any]:
    """(PeftModel with the adapter of ``adapter_dir``, tokenizer) over the base named by ``config``.

    ``quantize`` loads a qlora adapter's base in nf4 as it was trained; merging needs the float base instead.
    """
    from peft import PeftModel

    model_dir, tokenizer, _ = resolve_base(config)
    model = _load_causal_lm(config, model_dir, device, torch.float32, quantize)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load the adapter in {adapter_dir} onto base '{config.base_model}': {exc}") from exc
    peft_model.eval()
    return peft_model, tokenizer
