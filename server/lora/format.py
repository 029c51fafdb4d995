"""The PEFT LoRA adapter format: names, scaling, and reading a directory into validated ``AdapterWeights``.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys look like
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``); DoRA adds ``...lora_magnitude_vector`` (``[out]``). The trainer writes with the same helpers
(:func:`peft_key`, :func:`lora_scaling`), so names and scaling cannot drift apart between the two.

:func:`read_adapter` checks everything up front and raises one :class:`AdapterRejected` listing every problem
with how to fix it. Pickle ``.bin`` weights are never opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.server.core.shape import ATTENTION_MODULES, TARGET_MODULES, ModelShape

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
MANIFEST_FILE = "loraplex.json"

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>[A-Za-z0-9_]+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)
_PARTS = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "magnitude"}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED_CONFIG_VALUES: dict[str, tuple[Any, ...]] = {
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, {}, []),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
}


def module_block(module: str) -> str:
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def module_path(layer: int, module: str) -> str:
    """The module's name inside the HF model, as PEFT's ``rank_pattern`` keys match it."""
    return f"model.layers.{layer}.{module_block(module)}.{module}"


def peft_key(layer: int, module: str, part: str) -> str:
    """The safetensors key PEFT writes for ``part`` in ``lora_A.weight | lora_B.weight | lora_magnitude_vector``."""
    return f"base_model.model.{module_path(layer, module)}.{part}"


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class AdapterRejected(ValueError):
    """An adapter directory that cannot be served. ``problems`` lists each reason with its fix."""

    def __init__(self, adapter_id: str, problems: list[str]) -> None:
        self.adapter_id = adapter_id
        self.problems = problems
        super().__init__(f"adapter '{adapter_id}' rejected: " + "; ".join(problems))


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int
    max_file_bytes: int


@dataclass(frozen=True)
class LoraModuleWeights:
    """One targeted linear layer: ``delta(x) = (x @ a.T) @ b.T`` with the scaling already folded into ``b``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scaled
    magnitude: torch.Tensor | None  # [out], DoRA only


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter in host memory. Immutable: a replaced adapter is a new ``AdapterWeights``."""

    adapter_id: str
    source_dir: Path
    content_hash: str
    rank: int  # the largest rank over its modules
    target_modules: frozenset[str]
    use_dora: bool
    modules: Mapping[tuple[int, str], LoraModuleWeights]
    config: Mapping[str, Any] = field(repr=False)
    manifest: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        total = 0
        for weights in self.modules.values():
            total += weights.a.nbytes + weights.b.nbytes
            if weights.magnitude is not None:
                total += weights.magnitude.nbytes
        return total

    @property
    def layers(self) -> frozenset[int]:
        return frozenset(layer for layer, _ in self.modules)


def _read_json(path: Path, what: str, problems: list[str]) -> tuple[dict[str, Any] | None, bytes]:
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except FileNotFoundError:
        return None, b""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{what} {path.name} is not readable JSON ({exc}); rewrite it")
        return None, b""
    if not isinstance(data, dict):
        problems.append(f"{what} {path.name} must hold a JSON object")
        return None, b""
    return data, raw


def _check_config(config: dict[str, Any], limits: AdapterLimits, problems: list[str]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; loraplex serves only LORA adapters (re-train with LoRA)")
    for key, allowed in _SUPPORTED_CONFIG_VALUES.items():
        if config.get(key) not in allowed:
            problems.append(f"{key}={config.get(key)!r} is not supported; allowed: {allowed[0]!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems.append(f"r={rank!r} must be a positive integer")
    elif rank > limits.max_rank:
        problems.append(f"rank {rank} exceeds the server's maximum {limits.max_rank} (adapters.max_rank)")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha={alpha!r} must be a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            problems.append(f"{key} must be a mapping of module patterns to numbers")


def _layer_filter(config: Mapping[str, Any]) -> set[int] | None:
    layers = config.get("layers_to_transform")
    if layers is None:
        return None
    return {layers} if isinstance(layers, int) else set(layers)


def _collect_tensors(
    weights: bytes, shape: ModelShape, problems: list[str]
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{WEIGHTS_FILE} is corrupt or truncated ({exc}); re-export the adapter")
        return grouped
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            problems.append(
                f"tensor '{key}' is not a LoRA weight of a decoder layer; loraplex serves LoRA on "
                f"{', '.join(TARGET_MODULES)} only (no modules_to_save, embeddings or biases)"
            )
            continue
        layer, module = int(match["layer"]), match["module"]
        if module not in TARGET_MODULES or match["block"] != module_block(module):
            problems.append(f"tensor '{key}' targets unsupported module '{module}'")
            continue
        if layer >= shape.num_layers:
            problems.append(
                f"tensor '{key}' is for layer {layer} but the base has {shape.num_layers} layers "
                "(adapter trained for another base)"
            )
            continue
        if tensor.dtype not in _FLOAT_DTYPES:
            problems.append(f"tensor '{key}' has dtype {tensor.dtype}; use float32, float16 or bfloat16")
            continue
        grouped.setdefault((layer, module), {})[_PARTS[match["part"]]] = tensor
    return grouped


SERIAL_ELEMENTS = 32768  # torch's intra-op grain size: a copy of at most this many elements runs on its thread alone


def _as_float32(grouped: dict[tuple[int, str], dict[str, torch.Tensor]]) -> bool:
    """Replaces every tensor by a float32 view of one new buffer; returns whether every element is finite (one
    reduction over the buffer, checked exactly only when the sum is not finite).

    The conversion runs as copies of at most :data:`SERIAL_ELEMENTS` elements: each stays on the calling loader
    thread, where a parallel torch op would start an OpenMP team of its own and contend with the engine thread's
    (measured: 23 ms instead of 2 for a rank-64 q,v adapter). The views are writable and alias nothing the caller
    holds."""
    places = [(key, part) for key, parts in grouped.items() for part in parts]
    tensors = [grouped[key][part].reshape(-1) for key, part in places]
    flat = torch.empty(sum(tensor.numel() for tensor in tensors), dtype=torch.float32)
    offset = 0
    for (key, part), tensor in zip(places, tensors, strict=True):
        numel = tensor.numel()
        for start in range(0, numel, SERIAL_ELEMENTS):
            size = min(SERIAL_ELEMENTS, numel - start)
            flat[offset + start : offset + start + size].copy_(tensor[start : start + size])
        grouped[key][part] = flat[offset : offset + numel].view(grouped[key][part].shape)
        offset += numel
    values = flat.numpy()  # numpy reductions are single-threaded too
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum())) or bool(np.isfinite(values).all())


def _build_module(
    key: tuple[int, str],
    parts: dict[str, torch.Tensor],
    config: Mapping[str, Any],
    shape: ModelShape,
    limits: AdapterLimits,
    problems: list[str],
    all_finite: bool,
) -> LoraModuleWeights | None:
    """One module's weights from float32 ``parts`` (views :func:`_as_float32` made: ``b`` is scaled in place);
    ``all_finite`` (the whole file is) skips the per-tensor finiteness check."""
    layer, module = key
    where = module_path(layer, module)
    if "a" not in parts or "b" not in parts:
        problems.append(f"{where}: needs both lora_A and lora_B weights")
        return None
    a, b = parts["a"], parts["b"]
    in_features, out_features = shape.module_dims(module)
    rank = int(pattern_value(config.get("rank_pattern") or {}, where, config.get("r")))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, where, config.get("lora_alpha")))
    if a.ndim != 2 or b.ndim != 2 or a.shape != (rank, in_features) or b.shape != (out_features, rank):
        problems.append(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this base, which needs "
            f"({rank}, {in_features}) / ({out_features}, {rank}) (adapter trained for another base?)"
        )
        return None
    if rank > limits.max_rank:
        problems.append(f"{where}: rank {rank} exceeds the server's maximum {limits.max_rank}")
        return None
    magnitude = parts.get("magnitude")
    if bool(config.get("use_dora")) != (magnitude is not None):
        problems.append(
            f"{where}: use_dora={config.get('use_dora')!r} but lora_magnitude_vector is "
            f"{'present' if magnitude is not None else 'missing'}"
        )
        return None
    if magnitude is not None and magnitude.shape != (out_features,):
        problems.append(f"{where}: lora_magnitude_vector {tuple(magnitude.shape)} must be ({out_features},)")
        return None
    if not all_finite and not all(_all_finite(t) for t in ([a, b] if magnitude is None else [a, b, magnitude])):
        problems.append(f"{where}: weights contain NaN or Inf; re-train or re-export the adapter")
        return None
    scale = lora_scaling(alpha, rank, bool(config.get("use_rslora")))
    if scale != 1.0:
        np.multiply(b.numpy(), scale, out=b.numpy(), dtype=np.float32)  # in place, in numpy: see _as_float32
    return LoraModuleWeights(a=a, b=b, magnitude=magnitude)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or Inf makes the sum NaN or Inf, so a finite sum proves it in one
    reduction (30x cheaper than an element-wise mask); a sum that is not finite (or overflowed) is checked exactly."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _content_hash(config_bytes: bytes, weights: bytes) -> str:
    """sha256 of config + weights bytes, fed in turn (no concatenated copy of the weights)."""
    digest = hashlib.sha256(config_bytes)
    digest.update(weights)
    return digest.hexdigest()[:16]


def read_adapter(
    adapter_id: str,
    directory: Path,
    shape: ModelShape,
    limits: AdapterLimits,
    base_fingerprint: str | None = None,
) -> AdapterWeights:
    """Reads and validates a PEFT LoRA directory; raises :class:`AdapterRejected` listing every problem."""
    problems: list[str] = []
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config, config_bytes = _read_json(config_path, "config", problems)
    if config is None and not problems:
        problems.append(f"{CONFIG_FILE} is missing; a PEFT LoRA adapter directory needs it")
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_FILE).exists():
            problems.append(
                f"only pickle weights ({PICKLE_WEIGHTS_FILE}) found; loraplex never unpickles: re-save with "
                "save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
            )
        else:
            problems.append(f"{WEIGHTS_FILE} is missing")
    elif weights_path.stat().st_size > limits.max_file_bytes:
        problems.append(
            f"{WEIGHTS_FILE} is {weights_path.stat().st_size} bytes, over the limit of {limits.max_file_bytes} "
            "(adapters.max_file_bytes)"
        )
    if config is not None:
        _check_config(config, limits, problems)
    if problems or config is None:
        raise AdapterRejected(adapter_id, problems)

    manifest, _ = _read_json(directory / MANIFEST_FILE, "manifest", problems)
    recorded = (manifest or {}).get("base_fingerprint")
    if base_fingerprint and recorded and recorded != base_fingerprint:
        problems.append(
            f"trained for another base model (fingerprint {recorded[:19]}…, this server's base is "
            f"{base_fingerprint[:19]}…); re-train it on this base"
        )

    # Read once: the bytes hashed are the bytes parsed, even if the file is replaced meanwhile. The first read asks
    # for the size the open file has (one byte more shows growth): asking for the limit instead makes Python
    # allocate a buffer of the limit and shrink it, 4 ms per load whatever the file's size.
    try:
        with weights_path.open("rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            weights = handle.read(min(size, limits.max_file_bytes) + 1)
            if len(weights) > size:  # it grew while being read: read on, up to the limit
                weights += handle.read(limits.max_file_bytes + 1 - len(weights))
    except OSError as exc:
        raise AdapterRejected(adapter_id, [f"cannot read {WEIGHTS_FILE}: {exc}"]) from exc
    if len(weights) > limits.max_file_bytes:
        raise AdapterRejected(adapter_id, [f"{WEIGHTS_FILE} grew past adapters.max_file_bytes while being read"])
    grouped = _collect_tensors(weights, shape, problems)
    all_finite = _as_float32(grouped)
    allowed_layers = _layer_filter(config)
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for key in sorted(grouped):
        if allowed_layers is not None and key[0] not in allowed_layers:
            problems.append(f"{module_path(*key)}: weights present for a layer outside layers_to_transform")
            continue
        built = _build_module(key, grouped[key], config, shape, limits, problems, all_finite)
        if built is not None:
            modules[key] = built
    if not modules and not problems:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA weights")
    if problems:
        raise AdapterRejected(adapter_id, problems)
    return AdapterWeights(
        adapter_id=adapter_id,
        source_dir=directory,
        content_hash=_content_hash(config_bytes, weights),
        rank=max(w.a.shape[0] for w in modules.values()),
        target_modules=frozenset(module for _, module in modules),
        use_dora=bool(config.get("use_dora")),
        modules=modules,
        config=config,
        manifest=manifest,
    )
