"""Marker adapters: synthetic PEFT LoRA adapters that each force one known token, so a test can tell by content
which adapter (and which version of it) produced an answer.

A marker adapter is rank 1 on the last layer's ``o_proj`` only: ``A`` is the mean direction of that layer's
attention outputs (their projection onto it is positive at every position we measured, prompt and generated),
``B`` is a huge multiple of the marker token's embedding direction. The delta swamps the residual stream right
before the final norm, and the tied LM head then ranks the marker token first by a wide margin; the base's KV cache
is untouched (the last layer's K/V come before its ``o_proj``), so every generated token is the marker. Tokens are
chosen from those whose own embedding direction makes them the argmax with a margin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.server.lora.format import CONFIG_FILE, WEIGHTS_FILE, peft_key

_PROBE_PROMPTS = (
    "Write a short poem about the sea.",
    "The capital of France is",
    "hello",
    "1 2 3 4 5 6",
    "def f(x): return x * 2",
)
_STRENGTH = 1e5  # |delta| ≥ strength × min projection (~4 on SmolLM2): far above the residual stream's norm
_MIN_MARGIN = 0.2  # relative gap between the marker's logit and the runner-up, from the embeddings alone


@dataclass(frozen=True)
class MarkerBase:
    """What marker adapters need from the base: the last layer index, the input direction and marker tokens."""

    num_layers: int
    direction: torch.Tensor  # [hidden]: unit vector with a positive projection of every last-layer o_proj input
    embeddings: torch.Tensor  # [vocab, hidden]: the (tied) token embeddings
    tokens: tuple[int, ...]  # token ids that a push along their own embedding makes the argmax

    @classmethod
    def load(cls, base_dir: str | Path, count: int) -> MarkerBase:
        """Reads the base in ``base_dir`` and picks ``count`` marker tokens."""
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        inputs: list[torch.Tensor] = []
        last = model.model.layers[-1].self_attn.o_proj
        hook = last.register_forward_hook(
            lambda module, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        with torch.no_grad():
            for prompt in _PROBE_PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                model(ids)
        hook.remove()
        seen = torch.cat(inputs)
        unit = seen / seen.norm(dim=1, keepdim=True)
        direction = unit.mean(0)
        direction = direction / direction.norm()
        assert float((unit @ direction).min()) > 0.2, "no common direction of the last layer's o_proj inputs"
        tensors = load_file(str(Path(base_dir) / "model.safetensors"))
        embeddings = tensors["model.embed_tokens.weight"].float()
        norm = tensors["model.norm.weight"].float()
        return cls(model.config.num_hidden_layers, direction, embeddings, _marker_tokens(embeddings, norm, count))


def _marker_tokens(embeddings: torch.Tensor, norm: torch.Tensor, count: int) -> tuple[int, ...]:
    found: list[int] = []
    for start in range(1000, embeddings.shape[0], 500):  # in chunks: the full vocabulary is minutes of matmul
        candidates = torch.arange(start, min(start + 500, embeddings.shape[0]))
        units = embeddings[candidates] / embeddings[candidates].norm(dim=1, keepdim=True)
        scores = embeddings @ (norm[:, None] * units.T)  # [vocab, candidates]
        top = scores.topk(2, dim=0)
        margin = (top.values[0] - top.values[1]) / top.values[0].abs()
        found += [int(t) for t in candidates[(top.indices[0] == candidates) & (margin > _MIN_MARGIN)]]
        if len(found) >= count:
            return tuple(found[:count])
    raise AssertionError(f"only {len(found)} marker tokens in this base's vocabulary, {count} asked for")


def write_marker_adapter(directory: Path, base: MarkerBase, token: int) -> Path:
    """Writes (or atomically rewrites) a PEFT adapter in ``directory`` whose every generated token is ``token``."""
    directory.mkdir(parents=True, exist_ok=True)
    layer = base.num_layers - 1
    target = base.embeddings[token] / base.embeddings[token].norm()
    tensors = {
        peft_key(layer, "o_proj", "lora_A.weight"): base.direction[None, :].contiguous(),
        peft_key(layer, "o_proj", "lora_B.weight"): (_STRENGTH * target)[:, None].contiguous(),
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1.0,
        "lora_dropout": 0.0,
        "target_modules": ["o_proj"],
        "layers_to_transform": [layer],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    weights = directory / WEIGHTS_FILE
    temporary = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(temporary))
    temporary.replace(weights)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory
