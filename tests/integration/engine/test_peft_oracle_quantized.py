"""Quantized bases (bitsandbytes nf4 and int8, fp8, on this CPU) against PEFT on the same quantized base."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.server.config import ModelSettings
from loraplex.server.core.types import ChatMessage
from loraplex.server.model.loader import LoadedBase, load_base
from loraplex.server.model.quantize import load_quantized
from tests.integration.engine.conftest import make_engine, run_all
from tests.support.adapters import ALL_LINEAR, QV, write_adapter
from tests.support.peft_oracle import oracle_requests, peft_generate, peft_with_adapters

ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r8": {"rank": 8, "targets": QV, "strength": 2.0},
    "all-r16": {"rank": 16, "targets": ALL_LINEAR},
    "qv-r4-dora": {"rank": 4, "targets": QV, "use_dora": True, "strength": 2.0},
}
PROMPTS = ["Name a planet.", "What is 7 times 6?", "Give me a color.", "Say hello in French."]
MAX_NEW = 8
# nf4 layers compute in float32: PEFT's tolerance. int8 layers output float16, and PEFT rounds the LoRA term to
# float16 three times (cast, x scaling, add) where loraplex adds the float32 term once: float16-level agreement
# (base rows measured exact, LoRA rows 0.21 at most). fp8 quantizes every projection's input per token: rounding to
# 3 mantissa bits is discontinuous, so float32-level differences between the engine's forward and transformers'
# flip single activations by up to 1/16 and that spreads over 30 layers (base rows too: 0.31 at most measured, and
# one of four rows took another greedy token at step 7 of 8); the tokens are compared up to the first difference,
# which must come after half of them.
TOLERANCE = {"nf4": 1e-3, "int8": 0.3, "fp8": 0.4}


@pytest.mark.parametrize("quantization", ["nf4", "int8", "fp8"])
def test_quantized_engine_matches_peft_on_the_same_base(
    quantization: str, base: LoadedBase, base_dir: str, tmp_path: Path
) -> None:
    quantized = load_base(ModelSettings(base_model=base_dir, quantization=quantization))  # type: ignore[arg-type]
    assert quantized.quantization == quantization
    assert quantized.fingerprint == base.fingerprint  # same base, so adapters trained on either are accepted
    # PEFT's own DoRA forward on an int8 base breaks bitsandbytes' int8 state on CPU (its next int8 matmul fails
    # with col_stats=None), so PEFT cannot be the oracle there; DoRA is checked on nf4 here and int8 dequantization
    # for DoRA norms in test_dense_weight.py.
    adapters = {n: k for n, k in ADAPTERS.items() if quantization != "int8" or not k.get("use_dora")}
    for seed, (name, kwargs) in enumerate(adapters.items()):
        write_adapter(tmp_path / name, quantized.shape, seed=seed, **kwargs)
    # The same loading path as the server's: PEFT wraps a base whose nf4 layers compute in float32 as asked (on an
    # AVX512-BF16 CPU, bitsandbytes would otherwise switch them to its bfloat16 kernel; see quantize.py).
    model = load_quantized(base_dir, quantization, torch.float32, torch.device("cpu"))
    names = list(adapters)
    peft = peft_with_adapters(model, tmp_path, names)
    with torch.no_grad(), peft.disable_adapter():
        # bitsandbytes sets up an int8 layer's state on its first plain forward; on CPU a first call through a
        # PEFT LoRA wrapper fails inside bitsandbytes (int8_mm_dequant gets col_stats=None).
        peft(input_ids=torch.tensor([[1, 2, 3]]))

    # No prefix cache: the int8 rerun of each request alone must recompute its prompt, not reuse the blocks the
    # mixed batch wrote (int8 numerics depend on the batch, see below).
    engine = make_engine(quantized, [tmp_path], engine={"max_running": 8, "prefix_cache": False})
    try:
        rows: list[str | None] = [*names, None]
        requests = oracle_requests(rows, PROMPTS[: len(rows)], MAX_NEW)
        mixed = run_all(engine, requests)
        assert all(o.error is None and len(o.token_ids) > 0 for o in mixed)
        exact = mixed
        if quantization == "int8":
            # LLM.int8 computes the outlier columns of the whole batch in float16 (threshold 6), so batch
            # composition changes every row's numerics by design; the exact comparison runs each request alone.
            exact = [run_all(engine, [replace(r, request_id=r.request_id + "-alone")])[0] for r in requests]
        for name, prompt, outcome in zip(rows, PROMPTS[: len(rows)], exact, strict=True):
            assert outcome.error is None, outcome.error
            ids = engine.tokenize(messages=(ChatMessage("user", prompt),))
            tokens, want = peft_generate(peft, name, ids, MAX_NEW)
            same = len(tokens)
            if quantization == "fp8":
                same = next(
                    (i for i, (a, b) in enumerate(zip(outcome.token_ids, tokens, strict=False)) if a != b), len(tokens)
                )
                assert same >= MAX_NEW // 2, (name, outcome.token_ids, tokens)
            assert outcome.token_ids[:same] == tokens[:same], name
            worst = max(abs(a - b) for a, b in zip(outcome.logprobs[:same], want[:same], strict=True))
            assert worst <= TOLERANCE[quantization], name
    finally:
        engine.stop()
