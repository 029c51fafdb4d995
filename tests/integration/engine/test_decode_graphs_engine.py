"""The static decode step inside the engine (``engine.cuda_graphs=on``, run eagerly on CPU) against PEFT.

Decode steps mixing adapters of two pools (rank 8 q,v and rank 16 all-linear) with base rows, SGLang #28371's
wrong-output case, give PEFT's greedy tokens (float32, token-exact with PEFT scoring the engine's tokens,
log-probabilities within 1e-3) and the same
answers as ``cuda_graphs=off``; the engine's static-step counter proves which steps took it. Steps it must refuse
(a DoRA adapter among the rows, more rows than ``cuda_graph_max_rows``) fall back to the eager path per step and
stay exact, and preemption (block tables replaced under the static buffer's rows) keeps PEFT's tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.server.config import load_settings
from loraplex.server.core.errors import EngineError
from loraplex.server.core.events import EngineListener
from loraplex.server.core.types import (
    ChatMessage,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from loraplex.server.engine.engine import Engine, describe
from loraplex.server.model.loader import LoadedBase
from tests.integration.engine.conftest import Outcome
from tests.support.adapters import ALL_LINEAR, QV, write_adapter_set
from tests.support.peft_oracle import peft_logits, peft_with_adapters

ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r8-a": {"rank": 8, "targets": QV, "strength": 2.0},
    "qv-r8-b": {"rank": 8, "targets": QV, "strength": 2.0},
    "all-r16-a": {"rank": 16, "targets": ALL_LINEAR},
    "all-r16-b": {"rank": 16, "targets": ALL_LINEAR},
    "qv-r8-dora": {"rank": 8, "targets": QV, "use_dora": True, "strength": 2.0},
}
PROMPTS = [
    "Name a planet.",
    "Write one word about rain.",
    "What is 7 times 6?",
    "Give me a color.",
    "Say hello in French.",
    "What do bees make?",
]
LONG, SHORT = 10, 4  # max_new_tokens of the rows that outlive the others, and of those


class StepShapes(EngineListener):
    """(rows, sequences) of every step (a decode-only step has one row per sequence) and the preemptions."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.preemptions = 0

    def step(self, rows: int, sequences: int, adapters: int, seconds: float) -> None:
        self.steps.append((rows, sequences))

    def preempted(self, tokens: int) -> None:
        self.preemptions += 1

    def decode_only(self, sequences: int | None = None) -> int:
        return sum(1 for r, s in self.steps if r == s and (sequences is None or s == sequences))


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, base: LoadedBase) -> Path:
    return write_adapter_set(tmp_path_factory.mktemp("adapters"), base.shape, ADAPTERS)


@pytest.fixture(scope="module")
def peft_model(base_dir: str, adapter_root: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft_with_adapters(model, adapter_root, list(ADAPTERS))


def _requests(rows: list[tuple[str | None, int]]) -> list[GenerationRequest]:
    """One greedy chat request per (adapter, max_new_tokens), prompts in order; EOS ignored, so every row runs to
    its length and the steps' shapes are known."""
    return [
        GenerationRequest(
            request_id=f"r{i}",
            messages=(ChatMessage("user", prompt),),
            adapter_id=adapter,
            sampling=SamplingParams(max_new_tokens=new, logprobs=True, ignore_eos=True),
        )
        for i, ((adapter, new), prompt) in enumerate(zip(rows, PROMPTS[: len(rows)], strict=True))
    ]


class Collected:
    """An :class:`EventSink` that keeps a request's events (on the engine thread) and says when it ended."""

    def __init__(self, request_id: str) -> None:
        self.outcome = Outcome(request_id, "", [], [], None, None, 0.0)
        self.ended = threading.Event()

    def push(self, event: GenerationEvent) -> bool:
        if isinstance(event, TokenDelta):
            self.outcome.text += event.text
            self.outcome.token_ids += event.token_ids
            self.outcome.logprobs += event.logprobs or ()
        elif isinstance(event, Finished):
            self.outcome.finished = event
            self.ended.set()
        return True

    def fail(self, error: EngineError) -> None:
        self.outcome.error = error
        self.ended.set()


@pytest.fixture
def make_engine(base: LoadedBase, adapter_root: Path) -> Iterator[Callable[..., Engine]]:
    """Engines over the adapters, not started: :func:`_generate` queues every request before the first step."""
    engines: list[Engine] = []

    def make(listener: EngineListener | None = None, **engine: Any) -> Engine:
        overrides = {"adapters": {"roots": [str(adapter_root)]}, "engine": {"max_running": 8, **engine}}
        engines.append(Engine(base, load_settings(environ={}, overrides=overrides), listener))
        return engines[-1]

    yield make
    for engine in engines:
        engine.stop()


def _generate(engine: Engine, rows: list[tuple[str | None, int]]) -> list[Outcome]:
    """Runs the rows' requests, all queued (their adapters in memory) before the engine's first step, so the
    first step prefills them all and every later step decodes the rows still running."""
    engine.open()
    for name in {adapter for adapter, _ in rows if adapter}:
        engine.load_adapter(name).result()
    sinks = []
    for request in _requests(rows):
        sinks.append(Collected(request.request_id))
        engine.submit(request, sinks[-1])
    engine.start()
    for sink in sinks:
        assert sink.ended.wait(120), "the request did not end"
    return [sink.outcome for sink in sinks]


def _assert_peft(engine: Engine, peft: Any, rows: list[tuple[str | None, int]], outcomes: list[Outcome]) -> None:
    """Every engine token is PEFT's greedy choice given the tokens before it (EOS included: the engine ignores EOS,
    where PEFT's own generate would suppress it) and its log-probability is PEFT's within 1e-3."""
    for (name, new), prompt, outcome in zip(rows, PROMPTS[: len(rows)], outcomes, strict=True):
        assert outcome.error is None, outcome.error
        assert len(outcome.token_ids) == new
        prompt_ids = engine.tokenize(messages=(ChatMessage("user", prompt),))
        logits = peft_logits(peft, name, [*prompt_ids, *outcome.token_ids])[len(prompt_ids) - 1 : -1]
        want = torch.log_softmax(logits, -1)
        assert want.argmax(-1).tolist() == outcome.token_ids, f"{name}: {outcome.text!r}"
        chosen = want.gather(1, torch.tensor(outcome.token_ids).unsqueeze(1)).squeeze(1)
        assert (chosen - torch.tensor(outcome.logprobs)).abs().max().item() <= 1e-3, name


# the second row ends first: the rows after it move up a row of the same static buffer (another sequence's table)
MIXED: list[tuple[str | None, int]] = [
    ("qv-r8-a", LONG),
    ("all-r16-a", SHORT),
    (None, LONG),
    ("qv-r8-b", LONG),
    ("all-r16-b", LONG),
    (None, LONG),
]


def test_static_decode_of_mixed_pools_and_base_rows_matches_peft_and_eager(
    make_engine: Callable[..., Engine], peft_model: Any
) -> None:
    shapes = StepShapes()
    static, eager = make_engine(shapes, cuda_graphs="on"), make_engine(cuda_graphs="off")
    assert eager.graphs is None and "eager" in describe(eager)["decode_step"]
    got, want = _generate(static, MIXED), _generate(eager, MIXED)
    _assert_peft(static, peft_model, MIXED, got)
    for mine, theirs in zip(got, want, strict=True):
        assert mine.token_ids == theirs.token_ids
        assert max(abs(a - b) for a, b in zip(mine.logprobs, theirs.logprobs, strict=True)) <= 1e-3
    assert static.graphs is not None
    # every decode step of the rows (two pools and base rows together) took the static path
    assert shapes.decode_only(6) == SHORT - 1 and shapes.decode_only(5) == LONG - SHORT
    assert static.graphs.steps == LONG - 1 == len(shapes.steps) - 1
    facts = describe(static)["decode_step"]
    assert f"{LONG - 1} steps" in facts and "run eagerly" in facts and "decode attention sdpa-gather" in facts


@pytest.mark.parametrize(
    ("case", "rows", "settings"),
    [
        (
            "a DoRA row",
            [("qv-r8-a", LONG), (None, LONG), ("qv-r8-dora", SHORT), ("all-r16-a", SHORT), ("qv-r8-b", SHORT)],
            {},
        ),
        (
            "more rows than the largest bucket",
            [("all-r16-a", LONG), (None, LONG), ("qv-r8-a", SHORT), ("all-r16-b", SHORT), (None, SHORT)],
            {"cuda_graph_max_rows": 2},
        ),
    ],
)
def test_steps_the_static_step_refuses_run_eagerly_and_stay_exact(
    make_engine: Callable[..., Engine],
    peft_model: Any,
    case: str,
    rows: list[tuple[str | None, int]],
    settings: dict[str, Any],
) -> None:
    """Five rows decode together until the three short ones end (eager: refused), then two go on (static)."""
    shapes = StepShapes()
    engine = make_engine(shapes, cuda_graphs="on", **settings)
    outcomes = _generate(engine, rows)
    _assert_peft(engine, peft_model, rows, outcomes)
    assert engine.graphs is not None
    assert shapes.decode_only(len(rows)) == SHORT - 1, case  # the refused steps ran, eagerly
    assert engine.graphs.steps == shapes.decode_only(2) == LONG - SHORT, case


def test_preempted_rows_keep_peft_tokens_through_the_static_step(
    make_engine: Callable[..., Engine], peft_model: Any
) -> None:
    """A KV cache of one-token blocks too small for the six rows: the newest are preempted mid-decode and
    recomputed on resume (their block tables replaced, the static buffer's rows change sequences)."""
    shapes = StepShapes()
    engine = make_engine(
        shapes, cuda_graphs="on", kv_cache_tokens=256, kv_block_size=1, max_seq_len=256, prefix_cache=False
    )
    rows = [(adapter, LONG) for adapter, _ in MIXED]
    lengths = [len(engine.tokenize(messages=(ChatMessage("user", p),))) + LONG for p in PROMPTS]
    assert sum(lengths) > engine.kv.num_blocks - 1  # blocks must be taken back (one is the static step's scratch)
    outcomes = _generate(engine, rows)
    _assert_peft(engine, peft_model, rows, outcomes)
    assert shapes.preemptions > 0
    # a one-row recomputation chunk counts as one row per sequence too, so the static steps are at most those
    assert engine.graphs is not None and 0 < engine.graphs.steps <= shapes.decode_only() < len(shapes.steps)
