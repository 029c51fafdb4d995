"""Sampler, incremental detokenizer and stop strings against their definitions and HF's logits processors."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.server.core.types import SamplingParams
from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.server.engine.sampler import SamplerState, filtered_logprobs, sample

CPU = torch.device("cpu")
PROMPT = [3, 5, 5]

# One row of every kind: greedy, temperature only, top-k, top-p, both, repetition penalty above and below 1.
ROW_KINDS: list[dict[str, float | int]] = [
    {},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.6},
    {"temperature": 0.7},
    {"temperature": 1.3, "top_k": 20},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 0.9, "top_k": 50, "top_p": 0.9},
    {"temperature": 1.1, "repetition_penalty": 1.8},
    {"temperature": 0.8, "repetition_penalty": 0.7, "top_k": 30, "top_p": 0.95},
    {"temperature": 1.2, "repetition_penalty": 2.0, "top_p": 0.7},
    {"temperature": 1.0, "top_k": 10_000},  # top_k >= vocab: off
    {"temperature": 2.0, "top_p": 0.01},  # keeps the single most likely token
    {"temperature": 0.5, "top_k": 1},
]


def _state(prompt: list[int] = PROMPT, **params: object) -> SamplerState:
    return SamplerState.create(SamplingParams(**params), prompt, CPU)  # type: ignore[arg-type]


def _hf_scores(row: torch.Tensor, seen: list[int], params: SamplingParams) -> torch.Tensor:
    """The row's scores through transformers' processors, in generate's order, with the row's own parameters."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors(torch.tensor([seen]), row.unsqueeze(0).clone())[0]  # type: ignore[arg-type]


def _hf_logprobs(row: torch.Tensor, seen: list[int], params: SamplingParams) -> torch.Tensor:
    scores = _hf_scores(row, seen, params)
    if params.temperature == 0:  # greedy: all the mass on the argmax of the penalised scores
        return torch.full_like(scores, float("-inf")).scatter(0, scores.argmax().unsqueeze(0), 0.0)
    return torch.log_softmax(scores, dim=-1)


def _assert_same_distribution(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "different tokens filtered out"
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filtered_distributions_match_hf_processors_row_by_row(seed: int) -> None:
    rng = random.Random(seed)
    vocab = 1000
    kinds = ROW_KINDS[:]
    rng.shuffle(kinds)
    # Peaked logits so that top-p cuts; seen tokens include the row's best ones (positive) and negative ones.
    logits = 3 * torch.randn(len(kinds), vocab, generator=torch.Generator().manual_seed(seed))
    seen: list[list[int]] = []
    states = []
    for row, kind in enumerate(kinds):
        best = logits[row].topk(5).indices.tolist()
        prompt = [*best[:3], *rng.sample(range(vocab), 20)]
        seen.append(prompt)
        states.append(_state(prompt, seed=row, **kind))
    for step in range(3):  # the seen mask is built on first use, then kept up to date by observe
        for row, (state, kind) in enumerate(zip(states, kinds, strict=True)):
            got = filtered_logprobs(logits, states)[row]
            _assert_same_distribution(got, _hf_logprobs(logits[row], seen[row], SamplingParams(**kind)))  # type: ignore[arg-type]
            token = logits[row].topk(10).indices[3 + step].item() if step else rng.randrange(vocab)
            state.observe(int(token))
            seen[row].append(int(token))


def test_top_k_keeps_ties_like_hf() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 3.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    got = filtered_logprobs(logits, [_state([], temperature=1.0, top_k=2)])[0]
    _assert_same_distribution(got, _hf_logprobs(logits[0], [], params))
    assert torch.isfinite(got).tolist() == [False, True, True, True, False, True]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_scores() -> None:
    logits = torch.tensor([[4.0, -4.0, 1.0, 0.0, 3.0]])
    state = _state([0, 1], temperature=1.0, repetition_penalty=2.0)
    got = filtered_logprobs(logits, [state])[0]
    want = torch.log_softmax(torch.tensor([2.0, -8.0, 1.0, 0.0, 3.0]), -1)  # 4 / 2 and -4 * 2
    inverted = torch.log_softmax(torch.tensor([8.0, -2.0, 1.0, 0.0, 3.0]), -1)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, inverted, rtol=0, atol=1e-2)
    # the seen positive token's score is exactly half its logit: relative to an unseen token scored 0
    assert got[0] - got[3] == pytest.approx(2.0, abs=1e-6)
    assert got[1] - got[3] == pytest.approx(-8.0, abs=1e-6)
    # and HF agrees, so the oracle test would catch an inverted penalty
    hf = _hf_scores(logits[0], [0, 1], SamplingParams(temperature=1.0, repetition_penalty=2.0))
    assert hf.tolist() == [2.0, -8.0, 1.0, 0.0, 3.0]
    # a penalty below 1 favours repeats: the positive score doubles
    favoured = filtered_logprobs(logits, [_state([0, 1], temperature=1.0, repetition_penalty=0.5)])[0]
    assert favoured[0] - favoured[3] == pytest.approx(8.0, abs=1e-6)


def test_greedy_rows_take_argmax_of_penalised_logits() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0], [3.0, 2.0, -1.0], [-0.5, -1.0, -2.0], [-0.5, -1.0, -2.0]])
    states = [
        _state([0], repetition_penalty=2.0),  # 3 / 2 < 2: token 1
        _state([0]),  # no penalty: token 0
        _state([0], repetition_penalty=3.0),  # -0.5 * 3 < -1: token 1
        _state([0], temperature=1.0, top_k=1, seed=0),  # top-k 1 of the raw logits: token 0
    ]
    tokens, _ = sample(logits, states)
    assert tokens == [1, 0, 1, 0]
    # in a random mixed batch every greedy row is the argmax of HF's penalised scores
    vocab = 500
    logits = torch.randn(len(ROW_KINDS), vocab, generator=torch.Generator().manual_seed(4))
    prompts = [logits[row].topk(4).indices.tolist() for row in range(len(ROW_KINDS))]
    pairs = enumerate(zip(prompts, ROW_KINDS, strict=True))
    states = [_state(prompt, seed=row, **kind) for row, (prompt, kind) in pairs]
    tokens, _ = sample(logits, states)
    for row, kind in enumerate(ROW_KINDS):
        params = SamplingParams(**kind)  # type: ignore[arg-type]
        if params.temperature == 0:
            assert tokens[row] == _hf_scores(logits[row], prompts[row], params).argmax().item()


def test_plain_greedy_batch_takes_argmax_and_reports_raw_logprob() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits, [_state(), _state(), _state()])
    assert tokens == logits.argmax(-1).tolist()
    want = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert logprobs == want.tolist()
    assert sample(torch.zeros(0, 50), []) == ([], [])


def test_logprobs_are_raw_log_softmax_at_the_chosen_tokens() -> None:
    logits = torch.randn(len(ROW_KINDS), 300, generator=torch.Generator().manual_seed(5))
    states = [_state(seed=row, **kind) for row, kind in enumerate(ROW_KINDS)]
    for _ in range(5):
        tokens, logprobs = sample(logits, states)
        raw = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        assert logprobs == raw.tolist()
        for state, token in zip(states, tokens, strict=True):
            state.observe(token)


def _request_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    return 2 * torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + step))


def test_seeded_rows_draw_the_same_tokens_alone_and_in_any_batch() -> None:
    vocab, steps = 400, 40
    kinds: list[dict[str, float | int | None]] = [
        {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 11},  # followed
        {"temperature": 1.0, "seed": 12},  # followed
        {"temperature": 0.7, "top_p": 0.5, "seed": 13},  # followed
        {},
        {"repetition_penalty": 1.5},
        {"temperature": 1.0, "seed": None},  # unseeded
        {"temperature": 1.5, "top_k": 5, "repetition_penalty": 0.8, "seed": 99},
    ]
    followed = range(3)

    def alone(request: int) -> list[int]:
        state = _state([1, 2, 3], **kinds[request])
        out = []
        for step in range(steps):
            token = sample(_request_logits(request, step, vocab).unsqueeze(0), [state])[0][0]
            state.observe(token)
            out.append(token)
        return out

    rng = random.Random(0)
    states = [_state([1, 2, 3], **kind) for kind in kinds]
    batched: list[list[int]] = [[] for _ in kinds]
    for step in range(steps):
        order = list(range(len(kinds)))
        rng.shuffle(order)
        if step % 3:  # a random subset that always holds the followed requests, in a random order
            order = [*followed, *order[: rng.randint(0, len(kinds))]]
            order = list(dict.fromkeys(order))
            rng.shuffle(order)
        logits = torch.stack([_request_logits(request, step, vocab) for request in order])
        tokens, _ = sample(logits, [states[request] for request in order])
        for request, token in zip(order, tokens, strict=True):
            states[request].observe(token)
            batched[request].append(token)
    for request in followed:
        assert batched[request] == alone(request)
    assert len(set(alone(1))) > 5  # it really samples


def test_different_seeds_draw_different_tokens() -> None:
    logits = torch.zeros(1, 1000)

    def draw(seed: int) -> list[int]:
        state = _state(temperature=1.0, seed=seed)
        return [sample(logits, [state])[0][0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_draws_follow_the_filtered_distribution() -> None:
    vocab, rows, rounds = 20, 2000, 10
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)).expand(rows, vocab).contiguous()
    params: dict[str, float | int] = {"temperature": 0.6, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.3}
    seen = logits[0].topk(3).indices.tolist()
    states = [_state(seen, seed=row, **params) for row in range(rows)]
    want = filtered_logprobs(logits[:1], states[:1])[0].exp()
    counts = torch.zeros(vocab)
    for _ in range(rounds):
        tokens, _ = sample(logits, states)
        counts += torch.bincount(torch.tensor(tokens), minlength=vocab).float()
    freq = counts / (rows * rounds)
    assert (counts[want == 0] == 0).all()  # nothing outside the kept set is ever drawn
    tolerance = 0.015  # > 4 standard errors at 20,000 draws
    assert (freq - want).abs().max() < tolerance
    # the tolerance tells the right distribution from near ones: unfiltered, unpenalised, or untempered
    wrong = [
        torch.softmax(logits[0] / 0.6, -1),
        filtered_logprobs(logits[:1], [_state(seen, temperature=0.6, top_k=8, top_p=0.9)])[0].exp(),
        filtered_logprobs(logits[:1], [_state(seen, temperature=1.0, top_k=8, top_p=0.9, repetition_penalty=1.3)])[
            0
        ].exp(),
    ]
    for other in wrong:
        assert (freq - other).abs().max() > 2 * tolerance


def test_temperature_sampling_respects_top_k() -> None:
    logits = torch.arange(100, dtype=torch.float32).unsqueeze(0)
    state = _state(temperature=5.0, top_k=3, seed=0)
    drawn = {sample(logits, [state])[0][0] for _ in range(200)}
    assert drawn <= {97, 98, 99} and len(drawn) > 1


def test_tiny_temperature_overflowing_scores_still_picks_the_argmax() -> None:
    logits = torch.tensor([[0.0, 100.0, -3.0]])
    assert sample(logits, [_state(temperature=1e-37, seed=0)])[0] == [1]


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
