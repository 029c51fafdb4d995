"""Per-token mask cost of the constrained-decoding libraries at batch 32 with the base's tokenizer.

For each library installed (xgrammar, llguidance, outlines-core): compile one realistic JSON schema, then run 32
matchers through a fixed valid JSON document token by token, timing only the step's mask fill for all 32 rows
(``[32, vocab/32]`` int32 bitmask) and the token advance. Prints one line per library: compile seconds, mask
fill per step for the batch and per row, advance per step. Libraries that are not importable are skipped.

    .venv/bin/python loadtests/bench_structured_output.py [--rows 32] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.org",
        "tags": ["math", "engines"],
        "address": {"city": "London", "zip": "12345"},
        "active": True,
    },
    separators=(",", ":"),
)


def _tokenizer() -> PreTrainedTokenizerBase:
    models = Path.home() / ".cache" / "loraplex" / "models"
    return AutoTokenizer.from_pretrained(next(d for d in models.iterdir() if (d / "tokenizer.json").is_file()))


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _report(name: str, compile_s: float, fills: list[float], advances: list[float], rows: int) -> None:
    fill = statistics.median(fills)
    print(
        f"{name:14s} compile {compile_s:7.3f} s | mask fill per step (batch {rows}) median {fill * 1e3:7.3f} ms "
        f"p90 {sorted(fills)[int(len(fills) * 0.9)] * 1e3:7.3f} ms = {fill / rows * 1e6:7.1f} us/row | "
        f"advance {statistics.median(advances) * 1e3:6.3f} ms/step"
    )


def bench_llguidance(tok: PreTrainedTokenizerBase, ids: list[int], rows: int) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_s = _time(lambda: llguidance.LLMatcher(lltok, grammar))
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(rows)]
    executor = llguidance.LLExecutor()
    bitmask = llguidance.torch.allocate_token_bitmask(rows, len(tok))
    pairs = [(m, i) for i, m in enumerate(matchers)]
    fills, advances = [], []
    for token in ids:
        fills.append(_time(lambda: llguidance.torch.fill_next_token_bitmask_par(executor, pairs, bitmask)))
        advances.append(_time(lambda t=token: [m.consume_token(t) for m in matchers]))
    assert all(not m.is_error() and m.is_accepting() for m in matchers), matchers[0].get_error()
    _report("llguidance", compile_s, fills, advances, rows)


def bench_xgrammar(tok: PreTrainedTokenizerBase, ids: list[int], rows: int) -> None:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    compiled = None

    def build() -> None:
        nonlocal compiled
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)

    compile_s = _time(build)
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
    batch = xgrammar.BatchGrammarMatcher()
    bitmask = xgrammar.allocate_token_bitmask(rows, len(tok))
    fills, advances = [], []
    for token in ids:
        fills.append(_time(lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask)))
        advances.append(_time(lambda t=token: [m.accept_token(t) for m in matchers]))
    assert all(not m.is_terminated() for m in matchers)
    _report("xgrammar", compile_s, fills, advances, rows)


def bench_outlines_core(tok: PreTrainedTokenizerBase, ids: list[int], rows: int) -> None:
    import outlines_core
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    decode = {char: byte for byte, char in bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    for text, token_id in tok.get_vocab().items():
        if token_id != tok.eos_token_id:
            tokens.setdefault(bytes(decode.get(c, 0) for c in text), []).append(token_id)
    vocabulary = outlines_core.Vocabulary(tok.eos_token_id, tokens)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = None

    def build() -> None:
        nonlocal index
        index = outlines_core.Index(regex, vocabulary)

    compile_s = _time(build)
    guides = [outlines_core.Guide(index) for _ in range(rows)]
    bitmask = torch.zeros((rows, (len(tok) + 31) // 32), dtype=torch.int32)
    stride = bitmask.shape[1]
    fills, advances = [], []
    for token in ids:

        def fill() -> None:
            for row, guide in enumerate(guides):
                guide.write_mask_into(bitmask[row].data_ptr(), stride, 4)

        fills.append(_time(fill))
        advances.append(_time(lambda t=token: [g.advance(t, return_tokens=False) for g in guides]))
    assert all(g.is_finished() for g in guides)
    _report("outlines-core", compile_s, fills, advances, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="tokens of the document to step through")
    args = parser.parse_args()
    tok = _tokenizer()
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"][: args.steps]
    print(
        f"vocab {len(tok)}, {len(ids)} tokens of a {len(DOCUMENT)}-character document, "
        f"{torch.get_num_threads()} threads"
    )
    for bench in (bench_llguidance, bench_xgrammar, bench_outlines_core):
        try:
            bench(tok, ids, args.rows)
        except ImportError as exc:
            print(f"{bench.__name__.removeprefix('bench_'):14s} skipped: {exc}")


if __name__ == "__main__":
    main()
