"""Turns one step's scheduled chunks into the flat :class:`StepBatch` the forward pass consumes.

Chunks are ordered by (adapter pool, slot), base-model rows last, so each pool's rows are one contiguous range
sorted by slot (the LoRA mapping), and each sequence's rows stay contiguous (its attention span, whose keys the
:class:`~loraplex.server.model.attention.AttentionPlan` reads from its KV blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.server.engine.scheduler import ScheduledChunk
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.pool import SlotPool
from loraplex.server.model.attention import SequenceSpan, plan_attention
from loraplex.server.model.forward import StepBatch
from loraplex.server.model.kv_cache import KVCache


@dataclass(frozen=True)
class BuiltStep:
    batch: StepBatch
    chunks: tuple[ScheduledChunk, ...]  # in batch order
    sampled: tuple[ScheduledChunk, ...]  # chunks whose last row is sampled, in logits order


def _order_key(chunk: ScheduledChunk) -> tuple[int, int, int]:
    adapter = chunk.seq.adapter
    if adapter is None or adapter.placement is None:
        return (1, 0, 0)
    return (0, id(adapter.placement.pool), adapter.placement.slot)


def build_step(chunks: list[ScheduledChunk], kv: KVCache, device: torch.device) -> BuiltStep:
    ordered = sorted(chunks, key=_order_key)
    input_ids: list[int] = []
    positions: list[int] = []
    cache_index: list[int] = []
    spans: list[SequenceSpan] = []
    sample_rows: list[int] = []
    sampled: list[ScheduledChunk] = []
    prompt_rows: list[int] = []
    prompt_blocks: list[int] = []
    fresh_blocks: list[int] = []
    lora_rows: list[tuple[SlotPool, int, int]] = []
    for chunk in ordered:
        seq = chunk.seq
        start = len(input_ids)
        first = seq.num_computed
        stop = first + chunk.num_tokens
        input_ids += seq.token_ids(first, stop)
        positions += range(first, stop)
        slots = kv.slots(seq.blocks, first, stop)
        cache_index += slots
        spans.append(SequenceSpan(start, chunk.num_tokens, first, seq.blocks))
        if chunk.samples:
            sample_rows.append(len(input_ids) - 1)
            sampled.append(chunk)
        prompt_end = min(first + chunk.num_tokens, len(seq.prompt_ids))
        if first < prompt_end:
            prompt_rows += range(start, start + prompt_end - first)
            prompt_blocks += (slot // kv.block_size for slot in slots[: prompt_end - first])
            size = kv.block_size
            fresh_blocks += (seq.blocks[p // size] for p in range(first + -first % size, prompt_end, size))
        adapter = seq.adapter
        if adapter is not None and adapter.placement is not None:
            lora_rows.append((adapter.placement.pool, adapter.placement.slot, chunk.num_tokens))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    batch = StepBatch(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        cache_index=tensor(cache_index),
        attention=plan_attention(spans, kv.block_size, device),
        sample_rows=tensor(sample_rows),
        lora=LoraMapping.build(lora_rows, device),
        prompt_rows=tensor(prompt_rows) if prompt_rows else None,
        prompt_blocks=tensor(prompt_blocks) if prompt_blocks else None,
        fresh_blocks=tensor(fresh_blocks) if prompt_blocks else None,
    )
    return BuiltStep(batch, tuple(ordered), tuple(sampled))
