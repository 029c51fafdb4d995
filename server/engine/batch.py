"""Turns one step's scheduled chunks into the flat :class:`StepBatch` the forward pass consumes, or, for a
decode-only step, into the :class:`~loraplex.server.model.decode_graphs.DecodeRows` of the static decode step.

Chunks are ordered by (adapter pool, slot), base-model rows last, so each pool's rows are one contiguous range
sorted by slot (the LoRA mapping), and each sequence's rows stay contiguous (its attention span, whose keys the
:class:`~loraplex.server.model.attention.AttentionPlan` reads from its KV blocks). Decode rows keep the scheduler's
order (the static step has no segments) and pass each sequence's block table list itself, uncopied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.server.engine.scheduler import ScheduledChunk
from loraplex.server.engine.staging import StepUpload
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.pool import SlotPool
from loraplex.server.model.attention import SequenceSpan, plan_attention
from loraplex.server.model.decode_graphs import DecodeRows
from loraplex.server.model.forward import StepBatch
from loraplex.server.model.kv_cache import KVCache


@dataclass(frozen=True)
class BuiltStep:
    batch: StepBatch
    chunks: tuple[ScheduledChunk, ...]  # in batch order
    sampled: tuple[ScheduledChunk, ...]  # chunks whose last row is sampled, in logits order


@dataclass(frozen=True)
class BuiltDecode:
    rows: DecodeRows
    chunks: tuple[ScheduledChunk, ...]  # in row order; every one is sampled


def _placement(chunk: ScheduledChunk) -> tuple[SlotPool, int] | None:
    """(pool, slot) of the chunk's adapter; None for a base-model row."""
    adapter = chunk.seq.adapter
    if adapter is None or adapter.placement is None:
        return None
    return adapter.placement.pool, adapter.placement.slot


def _order_key(chunk: ScheduledChunk) -> tuple[int, int, int]:
    placement = _placement(chunk)
    return (1, 0, 0) if placement is None else (0, id(placement[0]), placement[1])


HOST = torch.device("cpu")


def build_step(chunks: list[ScheduledChunk], kv: KVCache, upload: StepUpload) -> BuiltStep:
    """The step batch, built on the host and moved to the device by ``upload`` (one copy)."""
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
        placement = _placement(chunk)
        if placement is not None:
            lora_rows.append((*placement, chunk.num_tokens))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    batch = StepBatch(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        cache_index=tensor(cache_index),
        attention=plan_attention(spans, kv.block_size, HOST),
        sample_rows=tensor(sample_rows),
        lora=LoraMapping.build(lora_rows, HOST),
        prompt_rows=tensor(prompt_rows) if prompt_rows else None,
        prompt_blocks=tensor(prompt_blocks) if prompt_blocks else None,
        fresh_blocks=tensor(fresh_blocks) if prompt_blocks else None,
    )
    return BuiltStep(upload(batch), tuple(ordered), tuple(sampled))


def build_decode(chunks: list[ScheduledChunk], kv: KVCache) -> BuiltDecode | None:
    """The step as decode rows when every chunk is one row past its sequence's prompt that samples its next token;
    None when any chunk is a prefill (a prompt, or a recomputation after preemption, which may need prompt rows)."""
    input_ids: list[int] = []
    positions: list[int] = []
    cache_slots: list[int] = []
    tables: list[list[int]] = []
    adapters: list[tuple[SlotPool, int] | None] = []
    for chunk in chunks:
        seq = chunk.seq
        position = seq.num_computed
        if chunk.num_tokens != 1 or position < len(seq.prompt_ids) or position + 1 != seq.total_len:
            return None
        input_ids.append(seq.output_ids[-1])
        positions.append(position)
        cache_slots += kv.slots(seq.blocks, position, position + 1)
        tables.append(seq.blocks)
        adapters.append(_placement(chunk))
    return BuiltDecode(DecodeRows(input_ids, positions, cache_slots, tables, adapters), tuple(chunks))
