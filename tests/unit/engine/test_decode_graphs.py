"""The static decode step (server/model/decode_graphs.py, eager on CPU) against the eager DecoderForward step.

One decode step over the embedded base mixes base rows with rows of three adapters in two pools of different
ranks and targets (the SGLang #28371 bug class: mixed adapters and base rows in one graph batch), padded from 5 to
a bucket of 8 rows, over shuffled KV blocks: same float32 logits (<= 3e-4 absolute; measured 1.7e-4) and greedy
tokens, and the adapters really change their rows' logits (so a step that dropped the LoRA would fail).
"""

from __future__ import annotations

import random

import torch

from loraplex.server.core.shape import TARGET_MODULES
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import select_kernels
from loraplex.server.lora.pool import PoolKey, SlotPool
from loraplex.server.model.attention import SequenceSpan, plan_attention
from loraplex.server.model.decode_graphs import DecodeGraphs, DecodeRows, decode_buckets
from loraplex.server.model.forward import DecoderForward, StepBatch
from loraplex.server.model.kv_cache import KVCache
from loraplex.server.model.loader import LoadedBase
from loraplex.server.model.paged_attention import paged_decode_attention_torch

CPU = torch.device("cpu")
BLOCK = 4


def _pool(base: LoadedBase, rank: int, modules: tuple[str, ...], seed: int) -> SlotPool:
    """A pool of 3 slots filled with random LoRA weights large enough to move the logits."""
    pool = SlotPool(PoolKey(rank, modules, False), base.shape, 3, torch.float32, CPU)
    generator = torch.Generator().manual_seed(seed)
    for module in modules:
        for a, b in zip(pool.a[module], pool.b[module], strict=True):
            a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.2)
    return pool


def test_buckets_cover_every_batch_size() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)


def test_static_step_matches_eager_forward_over_mixed_adapters_and_base_rows(base: LoadedBase) -> None:
    shape = base.shape
    kv = KVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, 512, torch.float32, CPU, BLOCK)
    forward = DecoderForward(base, kv, select_kernels(CPU, torch.float32))
    graphs = DecodeGraphs(forward, max_rows=16, max_seq_len=128, attention=paged_decode_attention_torch)
    generator = torch.Generator().manual_seed(0)
    for layer in range(shape.num_layers):  # a past for every sequence: random K/V of a realistic scale
        kv.k[layer].copy_(torch.randn(kv.k[layer].shape, generator=generator))
        kv.v[layer].copy_(torch.randn(kv.v[layer].shape, generator=generator))
    light = _pool(base, 8, ("q_proj", "v_proj"), seed=1)
    heavy = _pool(base, 16, TARGET_MODULES, seed=2)
    # rows in the eager path's order: by pool, then slot; base rows last
    adapters = [(light, 0), (light, 2), (heavy, 1), None, None]
    contexts = [9, 17, 3, 30, 12]
    rng = random.Random(3)
    tables = []
    for context in contexts:
        blocks = kv.allocator.allocate(kv.blocks_for(context + 1)) or []
        rng.shuffle(blocks)
        tables.append(blocks)
    tokens = [rng.randrange(shape.vocab_size) for _ in contexts]
    slots = [kv.slots(table, context, context + 1)[0] for table, context in zip(tables, contexts, strict=True)]
    saved = [t.clone() for t in (*kv.k, *kv.v)]

    spans = [SequenceSpan(i, 1, c, t) for i, (c, t) in enumerate(zip(contexts, tables, strict=True))]
    lora = LoraMapping.build([(pool, slot, 1) for pool, slot in (a for a in adapters if a is not None)], CPU)
    batch = StepBatch(
        input_ids=torch.tensor(tokens),
        positions=torch.tensor(contexts),
        cache_index=torch.tensor(slots),
        attention=plan_attention(spans, BLOCK, CPU),
        sample_rows=torch.arange(len(tokens)),
        lora=lora,
    )
    want = forward(batch).logits
    written = [kv.k[layer][slots].clone() for layer in range(shape.num_layers)]
    base_only = forward(StepBatch(**{**batch.__dict__, "lora": LoraMapping.empty()})).logits
    for buffer, kept in zip((*kv.k, *kv.v), saved, strict=True):
        buffer.copy_(kept)

    rows = DecodeRows(tokens, contexts, slots, tables, adapters)
    assert graphs.accepts(rows)
    got = graphs.run(rows)
    assert got is not None and got.shape == want.shape
    # float32 rounding of differently shaped matmuls and SDPA (8 padded rows against 5): measured 1.7e-4 at most
    # over logits of magnitude ~20 (log-probabilities 1.6e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (want[:3] - base_only[:3]).abs().amax(-1).min() > 1e-2  # the adapters matter on their rows
    torch.testing.assert_close(want[3:], base_only[3:], rtol=1e-5, atol=1e-5)
    for layer in range(shape.num_layers):  # both paths wrote the same K/V for the real rows
        torch.testing.assert_close(kv.k[layer][slots], written[layer], rtol=1e-4, atol=1e-4)
