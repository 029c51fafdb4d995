"""Paged attention: both SDPA layouts against the written-out per-sequence reference, over scattered KV blocks."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.server.model.attention import (
    Layout,
    SequenceSpan,
    attend,
    choose_layout,
    plan_attention,
    reference_attention,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4
CPU = torch.device("cpu")
FORCED: tuple[Layout, ...] = ("padded", "flat")


def _spans(shapes: list[tuple[int, int]], num_blocks: int, seed: int) -> list[SequenceSpan]:
    """(context, length) per sequence; each gets shuffled, non-contiguous blocks."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    spans, start = [], 0
    for context, length in shapes:
        need = -(-(context + length) // BLOCK)
        blocks, free = free[:need], free[need:]
        spans.append(SequenceSpan(start, length, context, blocks))
        start += length
    return spans


def _tensors(rows: int, num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=generator)
    return q, k, v


STEPS = {
    "decode": [(5, 1), (17, 1), (0, 1), (8, 1)],
    "prefill": [(0, 11)],
    "chunk after context": [(9, 6)],
    "mixed": [(0, 7), (12, 1), (3, 1), (6, 5), (0, 1), (20, 3)],
}


@pytest.mark.parametrize("layout", FORCED)
@pytest.mark.parametrize("step", list(STEPS))
def test_layout_matches_reference(layout: Layout, step: str) -> None:
    spans = _spans(STEPS[step], num_blocks=64, seed=len(step))
    rows = sum(span.length for span in spans)
    q, k, v = _tensors(rows, 64, seed=3)
    got = attend(q, k, v, plan_attention(spans, BLOCK, CPU, layout))
    want = reference_attention(q, k, v, spans, BLOCK)
    assert got.shape == (rows, HEADS, HEAD_DIM)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_first_prompt_token_sees_only_itself() -> None:
    """Causal and self-inclusive: a prompt's first query reads exactly its own value (a mask that hid a token
    from itself, or let it see the next one, changes this)."""
    spans = _spans([(0, 5), (0, 3)], num_blocks=8, seed=1)
    q, k, v = _tensors(8, 8, seed=2)
    for layout in FORCED:
        out = attend(q, k, v, plan_attention(spans, BLOCK, CPU, layout))
        for span in spans:
            slot = span.blocks[0] * BLOCK
            own = v[slot].repeat_interleave(HEADS // KV_HEADS, dim=0)
            assert torch.allclose(out[span.start], own, atol=1e-6)


def test_sequences_never_read_each_others_keys() -> None:
    spans = _spans([(6, 1), (6, 1)], num_blocks=8, seed=4)
    q, k, v = _tensors(2, 8, seed=5)
    before = attend(q, k, v, plan_attention(spans, BLOCK, CPU))
    other = torch.tensor([span.blocks[0] * BLOCK + i for span in spans[1:] for i in range(BLOCK)])
    k2, v2 = k.clone(), v.clone()
    k2[other], v2[other] = 100.0, -100.0
    after = attend(q, k2, v2, plan_attention(spans, BLOCK, CPU))
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_layout_follows_the_shape_of_the_step() -> None:
    decode = _spans([(60, 1)] * 32, num_blocks=1024, seed=0)
    assert choose_layout(decode) == "padded"
    prefill_with_decodes = _spans([(0, 400), *[(60, 1)] * 8], num_blocks=1024, seed=0)
    assert choose_layout(prefill_with_decodes) == "flat"
    assert choose_layout(_spans([(0, 40)], num_blocks=16, seed=0)) == "flat"


def test_random_steps_match_reference() -> None:
    rng = random.Random(7)
    for trial in range(40):
        shapes = [(rng.randint(0, 30), rng.choice([1, 1, 1, rng.randint(1, 12)])) for _ in range(rng.randint(1, 9))]
        spans = _spans(shapes, num_blocks=128, seed=trial)
        rows = sum(span.length for span in spans)
        q, k, v = _tensors(rows, 128, seed=trial)
        want = reference_attention(q, k, v, spans, BLOCK)
        for layout in ("auto", *FORCED):
            got = attend(q, k, v, plan_attention(spans, BLOCK, CPU, layout))
            assert torch.allclose(got, want, atol=1e-5), (trial, layout)


@pytest.mark.parametrize("layout", FORCED)
def test_bfloat16_attends_in_float32_on_cpu(layout: Layout) -> None:
    """Half-precision queries and caches on CPU are attended in float32 and come back in their own dtype: the
    result is float32's on the same (bf16-rounded) values, within one bf16 rounding of the output."""
    spans = _spans(STEPS["mixed"], num_blocks=64, seed=5)
    rows = sum(span.length for span in spans)
    q, k, v = (t.to(torch.bfloat16) for t in _tensors(rows, 64, seed=4))
    got = attend(q, k, v, plan_attention(spans, BLOCK, CPU, layout))
    assert got.dtype is torch.bfloat16
    want = reference_attention(q.float(), k.float(), v.float(), spans, BLOCK)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
