"""PEFT is the oracle: adapters of mixed ranks and targets, plus base rows, in one batch give PEFT's answers.

Each request's greedy tokens must equal ``PeftModel.generate`` with that adapter alone, and its logits must stay
within 1e-3 (fp32) of PEFT's, at the forward level (one mixed prefill batch) and along the whole generation
(per-token log-probabilities).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.server.core.events import EngineListener
from loraplex.server.core.types import ChatMessage
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import LoadedBase
from tests.integration.engine.conftest import Outcome, run_all
from tests.support.adapters import ALL_LINEAR, QV, write_adapter_set
from tests.support.mixed_forward import mixed_prefill_logits
from tests.support.peft_oracle import oracle_requests, peft_generate, peft_logits, peft_with_adapters

# name -> write_adapter keyword arguments: ranks 4..64, q,v and all-linear, rsLoRA, patterns, layer subsets, DoRA
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r4": {"rank": 4, "targets": QV, "strength": 2.0},
    "qv-r8": {"rank": 8, "targets": QV, "strength": 2.0},
    "all-r16": {"rank": 16, "targets": ALL_LINEAR},
    "all-r64": {"rank": 64, "targets": ALL_LINEAR, "strength": 0.7},
    "attn-r32-rslora": {
        "rank": 32,
        "targets": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "use_rslora": True,
        "alpha": 8,
    },
    "mlp-r8-patterns": {
        "rank": 8,
        "targets": ("gate_proj", "up_proj", "down_proj"),
        "rank_pattern": {"down_proj": 4},
        "alpha_pattern": {"up_proj": 32},
    },
    "qv-r16-layers": {"rank": 16, "targets": QV, "layers": list(range(0, 30, 2)), "strength": 3.0},
    "all-r12": {"rank": 12, "targets": ALL_LINEAR},
    "qv-r8-dora": {"rank": 8, "targets": QV, "use_dora": True, "strength": 2.0},
}
PROMPTS = [
    "Name a planet.",
    "Write one word about rain.",
    "What is 7 times 6?",
    "Give me a color.",
    "Say hello in French.",
    "Describe a cat in three words.",
    "What do bees make?",
    "Count to three.",
    "What is the opposite of hot?",
    "Name a fruit.",
    "What is ice made of?",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, base: LoadedBase) -> Path:
    return write_adapter_set(tmp_path_factory.mktemp("adapters"), base.shape, ADAPTERS)


@pytest.fixture(scope="module")
def peft_model(base: LoadedBase, base_dir: str, adapter_root: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft_with_adapters(model, adapter_root, list(ADAPTERS))


def test_adapters_change_the_output(base: LoadedBase, peft_model: Any) -> None:
    """Guards the oracle test itself: if adapters did nothing, equality with PEFT would prove nothing."""
    ids = base.tokenizer(PROMPTS[0])["input_ids"]
    base_logits = peft_logits(peft_model, None, ids)[-1]
    for name in ADAPTERS:
        assert (peft_logits(peft_model, name, ids)[-1] - base_logits).abs().max() > 0.5, name


def test_mixed_prefill_batch_logits_match_peft(base: LoadedBase, adapter_root: Path, peft_model: Any) -> None:
    """One forward pass over 9 adapters + 2 base rows: every row's last-token logits within 1e-3 of PEFT's."""
    names: list[str | None] = [*ADAPTERS, None, None]
    rows, logits, pools = mixed_prefill_logits(base, adapter_root, list(zip(names, PROMPTS, strict=True)))
    assert len(pools) >= 5  # really several pools in one pass
    for row, (name, prompt) in enumerate(rows):
        want = peft_logits(peft_model, name, base.tokenizer(prompt)["input_ids"])[-1]
        diff = (logits[row] - want).abs().max().item()
        assert diff <= 1e-3, f"{name}: max |logit diff| {diff}"


class PreemptionCounter(EngineListener):
    def __init__(self) -> None:
        self.preemptions = 0
        self.recomputed = 0

    def preempted(self, tokens: int) -> None:
        self.preemptions += 1
        self.recomputed += tokens


def _assert_peft_answers(engine: Engine, base: LoadedBase, peft_model: Any, outcomes: list[Outcome]) -> None:
    names: list[str | None] = [*ADAPTERS, None, None]
    for name, prompt, outcome in zip(names, PROMPTS, outcomes, strict=True):
        assert outcome.error is None, outcome.error
        prompt_ids = engine.tokenize(messages=(ChatMessage("user", prompt),))
        want_tokens, want_logprobs = peft_generate(peft_model, name, prompt_ids, MAX_NEW)
        assert outcome.token_ids == want_tokens, f"{name}: {outcome.text!r}"
        assert max(abs(a - b) for a, b in zip(outcome.logprobs, want_logprobs, strict=True)) <= 1e-3
        assert outcome.finished is not None
        assert outcome.finished.adapter_version == (1 if name else 0)
        assert outcome.finished.usage.completion_tokens == len(want_tokens)
        assert outcome.text == base.tokenizer.decode(want_tokens, skip_special_tokens=True)


def _run_oracle_requests(engine: Engine) -> list[Outcome]:
    for name in ADAPTERS:  # adapters resident first, so every request can join the very first step
        engine.load_adapter(name).result()
    return run_all(engine, oracle_requests([*ADAPTERS, None, None], PROMPTS, MAX_NEW))


def test_engine_mixed_batch_generates_peft_tokens(
    engine_factory: Any, base: LoadedBase, adapter_root: Path, peft_model: Any
) -> None:
    engine = engine_factory([adapter_root], engine={"max_running": 16, "max_batch_tokens": 2048})
    steps_before = engine.steps
    outcomes = _run_oracle_requests(engine)
    assert engine.steps - steps_before <= MAX_NEW + 2, "requests did not share batches"
    _assert_peft_answers(engine, base, peft_model, outcomes)


def test_chunked_prefill_generates_peft_tokens(
    engine_factory: Any, base: LoadedBase, adapter_root: Path, peft_model: Any
) -> None:
    """Every prompt is longer than the step's token budget, so each is prefilled over several steps (chunks that
    attend to the chunks before them in the cache), mixed with other sequences' decode rows."""
    engine = engine_factory([adapter_root], engine={"max_running": 16, "max_batch_tokens": 16})
    shortest = min(len(engine.tokenize(messages=(ChatMessage("user", p),))) for p in PROMPTS)
    assert shortest > 16
    outcomes = _run_oracle_requests(engine)
    _assert_peft_answers(engine, base, peft_model, outcomes)


def test_preemption_and_block_reuse_keep_peft_tokens(
    engine_factory: Any, base: LoadedBase, adapter_root: Path, peft_model: Any
) -> None:
    """A KV cache far too small for all eleven sequences at once: blocks run out mid-generation, the newest
    sequences are preempted and recomputed on resume, and freed blocks go to other sequences; every answer
    still equals PEFT's, token for token, and no token is emitted twice."""
    counter = PreemptionCounter()
    engine = engine_factory(
        [adapter_root],
        counter,
        engine={"max_running": 16, "kv_cache_tokens": 256, "kv_block_size": 1, "max_seq_len": 256},
    )
    # One-token blocks: the ~36-token prompts of seven sequences fill it, and each of their tokens then needs a
    # block; they run out within a few steps whatever the order of arrival (larger blocks let early finishers
    # hand theirs over just in time).
    assert engine.kv.num_blocks == 256
    lengths = [len(engine.tokenize(messages=(ChatMessage("user", p),))) + MAX_NEW for p in PROMPTS]
    assert sum(engine.kv.blocks_for(n) for n in lengths) > engine.kv.num_blocks  # blocks must be reused
    outcomes = _run_oracle_requests(engine)
    assert counter.preemptions > 0 and counter.recomputed > 0
    _assert_peft_answers(engine, base, peft_model, outcomes)
    assert engine.kv.allocator.num_free == engine.kv.num_blocks  # every block came back
