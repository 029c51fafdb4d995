"""Synthetic PEFT LoRA adapters for tests, benchmarks and load tests, written with PEFT's key names and scaling.

Weights are random but deterministic per seed, large enough that an adapter changes the base's greedy output.
PEFT loads these directories unchanged (tests use PEFT as the oracle), and so does the server.

    python -m loadtests.synthetic_adapters OUT_DIR --count 100 --rank 8 --targets q_proj,v_proj
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loraplex.server.core.shape import TARGET_MODULES, ModelShape
from loraplex.server.lora.format import CONFIG_FILE, WEIGHTS_FILE, module_path, pattern_value, peft_key

QV = ("q_proj", "v_proj")
ALL_LINEAR = TARGET_MODULES


def write_adapter(
    directory: Path,
    shape: ModelShape,
    rank: int,
    targets: Sequence[str] = QV,
    seed: int = 0,
    alpha: float | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    dtype: torch.dtype = torch.float32,
    use_dora: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Writes a PEFT LoRA adapter directory for a base of ``shape`` and returns it."""
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    alpha = float(2 * rank if alpha is None else alpha)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers if layers is not None else range(shape.num_layers):
        for module in targets:
            name = module_path(layer, module)
            r = int(pattern_value(rank_pattern or {}, name, rank))
            fan_in, fan_out = shape.module_dims(module)
            a = torch.randn(r, fan_in, generator=generator) / fan_in**0.5
            b = torch.randn(fan_out, r, generator=generator) * (strength / r) / 2
            tensors[peft_key(layer, module, "lora_A.weight")] = a.to(dtype).contiguous()
            tensors[peft_key(layer, module, "lora_B.weight")] = b.to(dtype).contiguous()
            if use_dora:
                magnitude = 1.0 + 0.1 * torch.rand(fan_out, generator=generator)
                tensors[peft_key(layer, module, "lora_magnitude_vector")] = magnitude.to(dtype)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "layers_to_transform": list(layers) if layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    config.update(extra_config or {})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def main() -> None:
    import argparse

    from transformers import AutoConfig

    from loraplex.server.config import default_cache_dir
    from loraplex.server.model.embedded import resolve_model_dir

    parser = argparse.ArgumentParser(description="Write synthetic PEFT LoRA adapters for a base model.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--base-model", default="embedded")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=",".join(QV))
    parser.add_argument("--prefix", default="synthetic-")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args()
    shape = ModelShape.from_config(AutoConfig.from_pretrained(resolve_model_dir(args.base_model, default_cache_dir())))
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    for index in range(args.count):
        write_adapter(
            args.out / f"{args.prefix}{index:04d}", shape, args.rank, args.targets.split(","), seed=index, dtype=dtype
        )
    print(f"wrote {args.count} adapters under {args.out}")


if __name__ == "__main__":
    main()
