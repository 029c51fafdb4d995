"""One forward pass over a mixed batch: prompts on different adapters (and the base) prefilled together.

The engine's own pieces (device slots, paged KV cache, LoRA mapping, attention plan, :class:`DecoderForward`)
without the scheduler, so a test can compare every row's last-token logits with an oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from loraplex.server.lora.format import AdapterLimits, read_adapter
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import lora_stack_dtype, select_kernels
from loraplex.server.lora.pool import DeviceSlots, Placement
from loraplex.server.model.attention import SequenceSpan, plan_attention
from loraplex.server.model.dora import dora_scales_for
from loraplex.server.model.forward import DecoderForward, StepBatch
from loraplex.server.model.kv_cache import KVCache
from loraplex.server.model.loader import LoadedBase


def mixed_prefill_logits(
    base: LoadedBase, adapter_root: Path, rows: Sequence[tuple[str | None, str]], lora_dtype: str = "auto"
) -> tuple[list[tuple[str | None, str]], torch.Tensor, set[object]]:
    """``rows`` of (adapter name or None, prompt) in one pass; returns the rows in batch order (the engine's order:
    by pool and slot, base rows last), their last-token float32 logits ``[rows, vocab]`` and the pool keys used.
    ``lora_dtype`` is ``engine.lora_dtype``."""
    shape = base.shape
    stack_dtype = lora_stack_dtype(base.device, base.dtype, lora_dtype)
    slots = DeviceSlots(shape, max_slots=16, max_bytes=8 << 30, dtype=stack_dtype, device=base.device)
    kv = KVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, 4096, base.dtype, base.device)
    forward = DecoderForward(base, kv, select_kernels(base.device, stack_dtype))
    limits = AdapterLimits(max_rank=128, max_file_bytes=1 << 30)
    placements: dict[str, Placement] = {}
    for name in sorted({name for name, _ in rows if name is not None}):
        weights = read_adapter(name, adapter_root / name, shape, limits, base.fingerprint)
        placement = slots.place(weights, dora_scales_for(base, weights))
        assert placement is not None
        placements[name] = placement

    def order(row: tuple[str | None, str]) -> tuple[bool, int, int]:
        name = row[0]
        if name is None:
            return (True, 0, 0)
        return (False, id(placements[name].pool), placements[name].slot)

    ordered = sorted(rows, key=order)
    ids: list[int] = []
    positions: list[int] = []
    cache_index: list[int] = []
    spans: list[SequenceSpan] = []
    last: list[int] = []
    lora_rows = []
    for name, prompt in ordered:
        prompt_ids = base.tokenizer(prompt)["input_ids"]
        blocks = kv.allocator.allocate(kv.blocks_for(len(prompt_ids)))
        assert blocks is not None
        spans.append(SequenceSpan(len(ids), len(prompt_ids), 0, blocks))
        ids += prompt_ids
        positions += range(len(prompt_ids))
        cache_index += kv.slots(blocks, 0, len(prompt_ids))
        last.append(len(ids) - 1)
        if name is not None:
            lora_rows.append((placements[name].pool, placements[name].slot, len(prompt_ids)))
    batch = StepBatch(
        torch.tensor(ids),
        torch.tensor(positions),
        torch.tensor(cache_index),
        plan_attention(spans, kv.block_size, base.device),
        torch.tensor(last),
        LoraMapping.build(lora_rows, base.device),
    )
    pools = {placement.pool.key for placement in placements.values()}
    return ordered, forward(batch).logits, pools
