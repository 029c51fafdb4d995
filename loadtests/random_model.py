"""Random-weight Llama models of real shapes, written as HF model directories: benchmarks and GPU checks need
the shape of an 8B model, not its knowledge, and nothing may be downloaded.

    python -m loadtests.random_model OUT_DIR --preset llama-8b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` synthetic words (ids are what matters for random weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # llguidance (the engine's constraint compiler) refuses a tokenizer without a decoder type; the vocabulary is
    # ASCII, which byte-level decoding maps to itself
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.save_pretrained(directory)


def write_random_llama(
    directory: Path, preset: str = "tiny", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **PRESETS[preset])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    _write_tokenizer(directory, config.vocab_size)
    (directory / "loraplex-random.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_random_llama(args.out, args.preset, getattr(torch, args.dtype), args.device, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
