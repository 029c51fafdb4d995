"""Sampler, incremental detokenizer and stop strings against their definitions and HF's logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.server.engine.sampler import SamplerState, _filter_top_k_top_p, sample
from loraplex.server.engine.types import SamplingParams

CPU = torch.device("cpu")


def _state(**params: object) -> SamplerState:
    return SamplerState.create(SamplingParams(**params), [3, 5, 5], CPU)  # type: ignore[arg-type]


def test_greedy_rows_take_argmax_and_report_raw_logprob() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits, [_state(), _state(), _state()])
    assert tokens == logits.argmax(-1).tolist()
    want = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert logprobs == pytest.approx(want.tolist())


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (10, 0.5), (1, 1.0), (0, 0.01)])
def test_top_k_top_p_match_hf_warpers(top_k: int, top_p: float) -> None:
    scores = torch.randn(1, 200, generator=torch.Generator().manual_seed(top_k))
    want = scores.clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = _filter_top_k_top_p(scores[0], top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want[0]))


def test_repetition_penalty_matches_hf() -> None:
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    state = _state(repetition_penalty=1.7)
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[3, 5, 5]]), logits.clone()).argmax(-1).item()
    tokens, _ = sample(logits.clone(), [state])
    assert tokens == [want]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.zeros(1, 1000)

    def draw(seed: int) -> list[int]:
        state = _state(temperature=1.0, seed=seed)
        return [sample(logits, [state])[0][0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_temperature_sampling_respects_top_k() -> None:
    logits = torch.arange(100, dtype=torch.float32).unsqueeze(0)
    state = _state(temperature=5.0, top_k=3, seed=0)
    drawn = {sample(logits, [state])[0][0] for _ in range(200)}
    assert drawn <= {97, 98, 99} and len(drawn) > 1


def test_incremental_detokenizer_is_utf8_safe(base) -> None:  # type: ignore[no-untyped-def]
    tokenizer = base.tokenizer
    text = "Größe: 東京タワー 🚀 café — naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize(
    ("chunks", "stops", "emitted", "final"),
    [
        (["Hello", " wor", "ld END", " more"], ("END",), "Hello world ", "Hello world "),
        (["a", "b", "c"], (), "abc", "abc"),
        (["The an", "swer"], ("answer!",), "The ", "The answer"),  # held back, flushed at the end
        (["x</", "s>y"], ("</s>",), "x", "x"),
        (["ab", "cd"], ("bc", "cd"), "a", "a"),  # the earliest stop wins
    ],
)
def test_stop_matcher(chunks: list[str], stops: tuple[str, ...], emitted: str, final: str) -> None:
    matcher = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        out += matcher.feed(chunk)
        if matcher.stopped:
            break
    assert out == emitted
    out += matcher.flush()
    assert out == final == matcher.text
