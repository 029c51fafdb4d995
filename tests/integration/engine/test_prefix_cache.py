"""The prefix cache against the PEFT oracle: a hit answers exactly what the cold request and PEFT answer, and
none of the peers' cache bugs happens here.

Each peer shipped one of these (vLLM #42125, #30931, #44701, SGLang #24638, llama.cpp #26207): blocks reused after
an adapter was replaced under the same id, across adapters, across tenants, across cache namespaces. Every test
asserts on the engine's prefix-cache counters (the ``loraplex_prefix_cache_*`` metrics' source) *and* on the
answers: greedy tokens equal to PEFT's with the right weights, log-probabilities within 1e-3 (fp32).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.server.core.events import EngineListener
from loraplex.server.core.types import ChatMessage, GenerationRequest, SamplingParams
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import LoadedBase
from tests.integration.engine.conftest import Outcome, run_all
from tests.support.adapters import ALL_LINEAR, QV, write_adapter
from tests.support.peft_oracle import peft_generate, peft_with_adapters

SYSTEM = (
    "You are a patient assistant for a small bakery in a quiet town by the sea. Answer every question in one short "
    "sentence, name the bread if you can, and never mention prices, opening hours or the weather."
)
QUESTIONS = (
    "What bread goes with soup?",
    "Which of your breads is the softest one for a small child to eat?",
    "What is rye?",
)
MAX_NEW = 8
# adapter name -> write_adapter keyword arguments; "swap-v2" is the replacement weights of adapter "swap"
ADAPTERS: dict[str, dict[str, Any]] = {
    "bakery": {"rank": 8, "targets": QV, "seed": 1, "strength": 2.0},
    "bistro": {"rank": 8, "targets": ALL_LINEAR, "seed": 2},
    "swap": {"rank": 8, "targets": QV, "seed": 3, "strength": 2.0},
    "swap-v2": {"rank": 8, "targets": QV, "seed": 4, "strength": 2.0},
}


class PrefixCounter(EngineListener):
    def __init__(self) -> None:
        self.lookups: list[tuple[int, int]] = []  # (prompt tokens, cached tokens)
        self.evictions = 0

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.lookups.append((prompt_tokens, cached_tokens))

    def prefix_evicted(self, blocks: int) -> None:
        self.evictions += blocks

    def cached_since(self, start: int) -> list[int]:
        return [cached for _, cached in self.lookups[start:]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, base: LoadedBase) -> Path:
    root = tmp_path_factory.mktemp("prefix-adapters")
    for name, kwargs in ADAPTERS.items():
        write_adapter(root / name, base.shape, **kwargs)
    return root


@pytest.fixture
def root(tmp_path: Path, sources: Path) -> Path:
    """The served adapters (a fresh copy per test: the replacement test rewrites "swap")."""
    for name in ("bakery", "bistro", "swap"):
        shutil.copytree(sources / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def peft_model(base_dir: str, sources: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft_with_adapters(model, sources, list(ADAPTERS))


def chat(
    request_id: str,
    adapter: str | None,
    question: str = QUESTIONS[0],
    tenant: str | None = "t1",
    salt: str | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        messages=(ChatMessage("system", SYSTEM), ChatMessage("user", question)),
        adapter_id=adapter,
        sampling=SamplingParams(max_new_tokens=MAX_NEW, logprobs=True),
        tenant=tenant,
        cache_salt=salt,
    )


def assert_peft(engine: Engine, peft: Any, request: GenerationRequest, outcome: Outcome, oracle: str | None) -> None:
    """``outcome`` is PEFT's greedy answer to ``request`` with adapter ``oracle`` active (None: the base)."""
    assert outcome.error is None, outcome.error
    assert request.messages is not None
    prompt_ids = engine.tokenize(messages=request.messages)
    tokens, logprobs = peft_generate(peft, oracle, prompt_ids, MAX_NEW)
    assert outcome.token_ids == tokens, f"{oracle}: {outcome.text!r}"
    assert max(abs(a - b) for a, b in zip(outcome.logprobs, logprobs, strict=True)) <= 1e-3


def full_blocks(engine: Engine, request: GenerationRequest) -> int:
    """Tokens of the request's prompt a hit can cover: its full blocks, short of its last token."""
    assert request.messages is not None
    size = engine.kv.block_size
    return (len(engine.tokenize(messages=request.messages)) - 1) // size * size


def test_a_hit_answers_what_the_cold_request_and_peft_answer(
    engine_factory: Any, root: Path, base: LoadedBase, peft_model: Any
) -> None:
    counter = PrefixCounter()
    engine: Engine = engine_factory([root], counter)
    first = chat("cold", "bakery")
    assert full_blocks(engine, first) >= 3 * engine.kv.block_size  # the shared prefix spans several blocks
    cold = run_all(engine, [first])[0]
    again, other = chat("warm", "bakery"), chat("other-question", "bakery", QUESTIONS[1])
    warm = run_all(engine, [again])[0]
    partial = run_all(engine, [other])[0]
    cached = counter.cached_since(0)
    assert cached[:2] == [0, full_blocks(engine, again)]
    assert 0 < cached[2] < full_blocks(engine, other)  # the system prompt's blocks, not the question's
    assert warm.token_ids == cold.token_ids
    assert max(abs(a - b) for a, b in zip(warm.logprobs, cold.logprobs, strict=True)) <= 1e-3
    for request, outcome in ((first, cold), (again, warm), (other, partial)):
        assert_peft(engine, peft_model, request, outcome, "bakery")
    # the prompt embedding (drift statistics) is pooled over the whole prompt on a hit too
    assert cold.finished is not None and warm.finished is not None
    cold_embedding, warm_embedding = cold.finished.prompt_embedding, warm.finished.prompt_embedding
    assert cold_embedding is not None and warm_embedding is not None
    assert max(abs(a - b) for a, b in zip(cold_embedding, warm_embedding, strict=True)) <= 1e-4
    assert engine.kv.allocator.num_used == 0 and engine.kv.allocator.num_cached > 0


def test_the_cache_turned_off_reuses_nothing(engine_factory: Any, root: Path) -> None:
    counter = PrefixCounter()
    engine: Engine = engine_factory([root], counter, engine={"prefix_cache": False})
    run_all(engine, [chat("one", "bakery")])
    run_all(engine, [chat("two", "bakery")])
    assert counter.lookups == [] and engine.kv.allocator.num_cached == 0


def test_two_adapters_and_the_base_never_share_blocks(
    engine_factory: Any, root: Path, base: LoadedBase, peft_model: Any
) -> None:
    counter = PrefixCounter()
    engine: Engine = engine_factory([root], counter)
    requests = [chat("on-a", "bakery"), chat("on-b", "bistro"), chat("on-base", None)]
    outcomes = [run_all(engine, [request])[0] for request in requests]
    assert counter.cached_since(0) == [0, 0, 0]
    for request, outcome, oracle in zip(requests, outcomes, ("bakery", "bistro", None), strict=True):
        assert_peft(engine, peft_model, request, outcome, oracle)
    again = chat("on-b-again", "bistro")
    assert_peft(engine, peft_model, again, run_all(engine, [again])[0], "bistro")
    assert counter.lookups[-1][1] == full_blocks(engine, again)  # each adapter hits its own blocks


def test_a_replaced_adapter_never_meets_its_old_blocks(
    engine_factory: Any, root: Path, sources: Path, peft_model: Any
) -> None:
    """vLLM #42125 / #30931: the same adapter id with new weights while the old version's blocks are cached."""
    counter = PrefixCounter()
    engine: Engine = engine_factory([root], counter)
    old = chat("v1", "swap")
    assert_peft(engine, peft_model, old, run_all(engine, [old])[0], "swap")
    cached_before = engine.kv.allocator.num_cached
    assert cached_before > 0
    shutil.rmtree(root / "swap")
    shutil.copytree(sources / "swap-v2", root / "swap")
    assert engine.load_adapter("swap").result().version == 2
    new = chat("v2", "swap")
    outcome = run_all(engine, [new])[0]
    assert counter.lookups[-1][1] == 0  # the v1 blocks are still cached, but not under v2's key
    assert outcome.finished is not None and outcome.finished.adapter_version == 2
    assert_peft(engine, peft_model, new, outcome, "swap-v2")
    again = chat("v2-again", "swap")
    assert_peft(engine, peft_model, again, run_all(engine, [again])[0], "swap-v2")
    assert counter.lookups[-1][1] == full_blocks(engine, again)  # v2 hits its own blocks


def test_tenants_share_nothing_unless_configured(
    engine_factory: Any, root: Path, base: LoadedBase, peft_model: Any
) -> None:
    counter = PrefixCounter()
    apart: Engine = engine_factory([root], counter)
    requests = [
        chat("t1", "bakery", tenant="t1"),
        chat("t2", "bakery", tenant="t2"),
        chat("t2-again", "bakery", tenant="t2"),
    ]
    outcomes = [run_all(apart, [request])[0] for request in requests]
    assert counter.cached_since(0) == [0, 0, full_blocks(apart, requests[2])]
    assert_peft(apart, peft_model, requests[1], outcomes[1], "bakery")

    shared_counter = PrefixCounter()
    shared: Engine = engine_factory([root], shared_counter, engine={"prefix_cache_share_tenants": True})
    first, other = chat("t1", "bakery", tenant="t1"), chat("t2", "bakery", tenant="t2")
    run_all(shared, [first])
    outcome = run_all(shared, [other])[0]
    assert shared_counter.cached_since(0) == [0, full_blocks(shared, other)]
    assert_peft(shared, peft_model, other, outcome, "bakery")


def test_a_cache_salt_is_its_own_namespace(engine_factory: Any, root: Path, base: LoadedBase, peft_model: Any) -> None:
    counter = PrefixCounter()
    engine: Engine = engine_factory([root], counter, engine={"prefix_cache_share_tenants": True})
    requests = [
        chat("plain", "bakery"),
        chat("salted", "bakery", salt="s1"),
        chat("salted-again", "bakery", salt="s1"),
        chat("other-salt", "bakery", salt="s2"),
        chat("salted-other-tenant", "bakery", tenant="t2", salt="s1"),  # shared tenants: the salt alone names it
    ]
    outcomes = [run_all(engine, [request])[0] for request in requests]
    full = full_blocks(engine, requests[0])
    assert counter.cached_since(0) == [0, 0, full, 0, full]
    assert_peft(engine, peft_model, requests[2], outcomes[2], "bakery")


def test_eviction_under_kv_pressure_mid_generation_keeps_peft_answers(
    engine_factory: Any, root: Path, base: LoadedBase, peft_model: Any
) -> None:
    """A cache far too small for nine sequences: with one-token blocks every decode step needs blocks, so idle
    cached blocks are evicted for live sequences while others generate (and running ones are preempted when the
    arrivals overlap enough: test_peft_oracle's preemption test forces that, with the cache on too); a shared block
    a running sequence reads is never taken from it (its answer would change), and every answer stays PEFT's."""
    counter = PrefixCounter()
    engine: Engine = engine_factory(
        [root],
        counter,
        engine={"max_running": 16, "kv_cache_tokens": 256, "kv_block_size": 1, "max_seq_len": 256},
    )
    requests = [
        chat(f"q{i}-{adapter}", adapter, question)
        for i, question in enumerate(QUESTIONS)
        for adapter in ("bakery", "bistro", None)
    ]
    outcomes = run_all(engine, requests)
    assert counter.evictions > 0
    assert any(cached for _, cached in counter.lookups)  # blocks were shared while others were evicted
    for request, outcome in zip(requests, outcomes, strict=True):
        assert_peft(engine, peft_model, request, outcome, request.adapter_id)
    assert engine.kv.allocator.num_used == 0  # every reference came back
