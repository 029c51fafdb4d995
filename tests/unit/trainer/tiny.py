"""Helpers for trainer tests: a tiny random-weight Llama with the embedded tokenizer, and dataset files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def make_tiny_base(directory: Path, tokenizer_dir: str, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer Llama (hidden 64) with the embedded base's tokenizer and chat template, saved as safetensors.

    No ``pad_token_id`` in the config: it would zero the embedding row of EOS (= pad), which is tied to the
    output layer, and no adapter could then learn to end a completion.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough embeddings that a LoRA can make confident predictions
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: Iterable[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def alpaca_records(count: int, offset: int = 0) -> list[dict[str, str]]:
    """A memorisable task: the word for a number, in a fixed pattern."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return [
        {"instruction": f"Spell the digit {(i + offset) % 10}.", "output": words[(i + offset) % 10]}
        for i in range(count)
    ]


def config_tree(base: Path, train: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast training config as a dict (keys as in the YAML file)."""
    tree: dict[str, Any] = {
        "base_model": str(base),
        "datasets": [{"path": str(train), "format": "alpaca"}],
        "output_dir": str(out),
        "r": 4,
        "lora_alpha": 8,
        "max_steps": 6,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "max_length": 96,
        "val_size": 4,
        "eval_max_examples": 4,
        "eval_max_new_tokens": 4,
        "progress": False,
    }
    tree.update(overrides)
    return tree


def lora_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0, keys: Sequence[str] | None = None) -> None:
    left, right = lora_state(a), lora_state(b)
    assert set(left) == set(right)
    for key in keys or sorted(left):
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=0)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, base_dir: str) -> Path:
    """The tiny Llama, written once per session."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"), base_dir)


@pytest.fixture(scope="session")
def tokenizer(base_dir: str) -> Any:
    return AutoTokenizer.from_pretrained(base_dir)
