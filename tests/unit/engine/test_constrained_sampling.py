"""The sampler's structured-output masks against a reference: the allowed ids worked out from the vocabulary by
hand, in a batch that mixes constrained and free rows, greedy and sampled."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.types import Constraint, ConstraintKind, SamplingParams
from loraplex.server.engine.constraints import ConstraintCompiler
from loraplex.server.engine.sampler import SamplerState, filtered_logprobs, sample

CPU = torch.device("cpu")
DIGITS = Constraint(ConstraintKind.REGEX, "[0-9]{3}")


@pytest.fixture(scope="module")
def tokenizer(base_dir: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: PreTrainedTokenizerBase) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def _digit_ids(tokenizer: PreTrainedTokenizerBase, most: int) -> set[int]:
    """The reference: every token that is 1..``most`` ASCII digits (byte-level tokens spell digits as themselves)."""
    pattern = re.compile(f"[0-9]{{1,{most}}}")
    return {i for token, i in tokenizer.get_vocab().items() if pattern.fullmatch(token)}


def _states(compiler: ConstraintCompiler) -> list[SamplerState]:
    rows = [(DIGITS, 0.0), (None, 0.0), (DIGITS, 1.0), (None, 1.0), (DIGITS, 0.7)]
    return [
        SamplerState.create(
            SamplingParams(temperature=temperature, seed=7 + row, top_k=50 if row == 4 else 0),
            [1, 2],
            CPU,
            compiler.matcher(constraint) if constraint is not None else None,
        )
        for row, (constraint, temperature) in enumerate(rows)
    ]


def test_masked_logits_are_minus_inf_exactly_on_disallowed_ids(
    compiler: ConstraintCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    vocab = len(tokenizer)
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[sorted(_digit_ids(tokenizer, 3))] = True
    states = _states(compiler)
    out = filtered_logprobs(logits, states)
    free = filtered_logprobs(logits, [SamplerState.create(s.params, [1, 2], CPU) for s in states])
    assert torch.equal(torch.isfinite(out[2]), allowed)  # sampled, temperature 1, no top-k: every allowed id
    assert torch.equal(out[1], free[1]) and torch.equal(out[3], free[3])  # free rows: as without constraints
    assert not torch.isfinite(out[4][~allowed]).any()  # top-k inside the allowed ids
    greedy = int(out[0].argmax())
    assert greedy == int(logits[0].masked_fill(~allowed, float("-inf")).argmax()) and allowed[greedy]

    tokens, logprobs = sample(logits, states)
    reference, _ = sample(logits, [SamplerState.create(s.params, [1, 2], CPU) for s in states])
    assert tokens[0] == greedy and tokens[1] == reference[1] and tokens[3] == reference[3]
    assert all(allowed[tokens[row]] for row in (0, 2, 4))
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[greedy]))  # the raw log-probability


def test_eos_only_once_the_grammar_accepts(compiler: ConstraintCompiler, tokenizer: PreTrainedTokenizerBase) -> None:
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    state = SamplerState.create(SamplingParams(temperature=1.0, seed=1), [1], CPU, compiler.matcher(DIGITS))
    logits = torch.zeros(1, vocab)
    logits[0, eos] = 50.0  # the model wants to stop at once
    for _ in range(3):
        assert torch.isinf(filtered_logprobs(logits, [state])[0, eos])
        token = sample(logits, [state])[0][0]
        assert token in _digit_ids(tokenizer, 3) and state.observe(token)
        if state.matcher is not None and state.matcher.complete:
            break
    assert state.matcher is not None and state.matcher.complete
    assert torch.isfinite(filtered_logprobs(logits, [state])[0]).nonzero().flatten().tolist() == [eos]


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "nosuch"}'), "Invalid type"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "must be a JSON object"),
        (Constraint(ConstraintKind.REGEX, "(a"), "unclosed group"),
        (Constraint(ConstraintKind.GRAMMAR, "start: missing_rule"), "missing_rule"),
    ],
)
def test_an_uncompilable_spec_is_invalid_request(
    compiler: ConstraintCompiler, constraint: Constraint, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        compiler.matcher(constraint)
