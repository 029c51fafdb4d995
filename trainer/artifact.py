"""The adapter directory on disk: LoRA tensors named with the server's :func:`peft_key`, PEFT's config file.

The same functions write the final adapter and every checkpoint, and read a checkpoint's weights back on resume.
Names and scaling come from :mod:`loraplex.server.lora.format`, which the server reads with; a PEFT layer whose
scaling disagrees with :func:`lora_scaling` is refused rather than written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraplex.server.lora.format import CONFIG_FILE, WEIGHTS_FILE, lora_scaling, module_block, peft_key
from loraplex.trainer.config import TrainConfig

ADAPTER = "default"


def lora_parameters(peft_model: Any, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Every trainable LoRA parameter keyed by the name PEFT (and the server) stores it under."""
    params: dict[str, torch.nn.Parameter] = {}
    layers = peft_model.base_model.model.model.layers
    use_rslora = config.method == "rslora"
    for index, layer in enumerate(layers):
        for module in config.modules:
            linear = getattr(getattr(layer, module_block(module)), module)
            expected = lora_scaling(config.lora_alpha, config.r, use_rslora)
            if abs(linear.scaling[ADAPTER] - expected) > 1e-9:
                raise RuntimeError(f"PEFT scaling {linear.scaling[ADAPTER]} != loraplex scaling {expected}")
            params[peft_key(index, module, "lora_A.weight")] = linear.lora_A[ADAPTER].weight
            params[peft_key(index, module, "lora_B.weight")] = linear.lora_B[ADAPTER].weight
            if config.method == "dora":
                params[peft_key(index, module, "lora_magnitude_vector")] = linear.lora_magnitude_vector[ADAPTER].weight
    return params


def write_adapter(directory: Path, peft_model: Any, config: TrainConfig) -> None:
    """Writes ``adapter_config.json`` (PEFT's writer) and ``adapter_model.safetensors`` (float32)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: param.detach().to("cpu", torch.float32).contiguous()
        for key, param in lora_parameters(peft_model, config).items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = copy.deepcopy(peft_model.peft_config[ADAPTER])
    peft_config.base_model_name_or_path = config.base_model
    peft_config.inference_mode = True
    peft_config.target_modules = sorted(config.modules)
    peft_config.save_pretrained(str(directory))
    # PEFT writes keys sorted; re-read to make sure the file is JSON the server accepts (no sets, no enums).
    json.loads((directory / CONFIG_FILE).read_text())


def read_weights(directory: Path, peft_model: Any, config: TrainConfig) -> None:
    """Copies the weights of an adapter directory written by :func:`write_adapter` into ``peft_model``."""
    tensors = load_file(str(directory / WEIGHTS_FILE))
    params = lora_parameters(peft_model, config)
    if set(tensors) != set(params):
        raise ValueError(f"{directory} does not hold the weights of this run's adapter (different targets or base)")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
