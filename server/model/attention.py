"""Attention over the paged KV cache: one ``scaled_dot_product_attention`` call per layer for the whole step.

A step mixes prefill chunks and one-token decode rows of many sequences. :func:`plan_attention` (run once per step,
while the batch is built) turns their spans into an :class:`AttentionPlan`: which cache slots each query reads
and the mask that keeps every query to its own sequence's past (itself included). Every layer then gathers those
slots from its K/V buffers (token-major rows, one ``index_select`` each) and makes one SDPA call, in one of two
layouts chosen per step by the work each implies:

* **padded** ``[S, heads, Qmax, Lmax]``: one batch entry per sequence, queries and keys padded to the longest.
  Decode-heavy steps (Qmax = 1) cost ``S * Lmax``, not the ``T * N`` of one flat block-diagonal matrix.
  Padded query rows attend key 0 only, so they never produce NaN; their output is dropped.
* **flat** ``[1, heads, T, N]``: all ``T`` query rows against all ``N`` gathered keys, with a block-diagonal
  causal mask. Prefill-heavy steps (one long chunk and a few decode rows) waste little here and skip the
  query gather and padding.

:func:`reference_attention` is the plain per-sequence loop (explicit softmax over each sequence's keys), kept for
the tests as the oracle of both layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence's rows in this step and where its keys live."""

    start: int  # first row in the batch
    length: int  # rows this step
    context: int  # tokens already in the cache before this step
    blocks: Sequence[int]  # its block table (covers context + length positions)

    @property
    def keys(self) -> int:
        """Positions this span's queries may read: its context and its own rows."""
        return self.context + self.length


@dataclass(frozen=True)
class AttentionPlan:
    """The slots, mask and (padded layout) query placement shared by every layer of one step."""

    key_slots: torch.Tensor  # [B * L] long: cache slots gathered, B batch entries of L keys
    mask: torch.Tensor  # [B, 1, Q, L] bool: which keys each query may read
    query_rows: torch.Tensor | None  # [B * Q] long: batch row of each padded query; None = the rows in order
    output_rows: torch.Tensor | None  # [T] long: where each batch row's output lies among the B * Q; None = in order

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, Q, L)."""
        return self.mask.shape[0], self.mask.shape[2], self.mask.shape[3]


def _slot_matrix(spans: Sequence[SequenceSpan], block_size: int, width: int) -> torch.Tensor:
    """``[B, width]`` cache slots of positions ``0 .. width - 1`` of every span; past a span's own keys the
    slots are arbitrary valid ones (the mask hides them)."""
    count = -(-width // block_size)
    table = [list(span.blocks[:count]) + [span.blocks[0]] * (count - min(len(span.blocks), count)) for span in spans]
    blocks = torch.tensor(table).repeat_interleave(block_size, dim=1)[:, :width]
    return blocks * block_size + torch.arange(width) % block_size


def _padded_plan(spans: Sequence[SequenceSpan], block_size: int, device: torch.device) -> AttentionPlan:
    width = max(span.keys for span in spans)
    queries = max(span.length for span in spans)
    entries = len(spans)
    start = torch.tensor([span.start for span in spans])[:, None, None]
    context = torch.tensor([span.context for span in spans])[:, None, None]
    length = torch.tensor([span.length for span in spans])[:, None, None]
    query = torch.arange(queries)[None, :, None]
    key = torch.arange(width)[None, None, :]
    real = query < length  # [B, Q, 1]
    mask = torch.where(real, key <= context + query, key == 0)
    in_order = queries == 1 and all(span.start == entry for entry, span in enumerate(spans))
    query_rows = output_rows = None
    if not in_order:
        query_rows = torch.where(real, start + query, start).flatten().to(device)
        output_rows = torch.arange(entries * queries).view(entries, queries, 1)[real].to(device)
    return AttentionPlan(
        key_slots=_slot_matrix(spans, block_size, width).flatten().to(device),
        mask=mask[:, None].to(device),
        query_rows=query_rows,
        output_rows=output_rows,
    )


def _flat_plan(spans: Sequence[SequenceSpan], block_size: int, device: torch.device) -> AttentionPlan:
    width = max(span.keys for span in spans)
    keys = torch.tensor([span.keys for span in spans])
    lengths = torch.tensor([span.length for span in spans])
    contexts = torch.tensor([span.context for span in spans])
    owners = torch.arange(len(spans))
    key_position = torch.arange(width)[None, :]
    valid = key_position < keys[:, None]  # [B, width]: each span's own keys, in order
    slots = _slot_matrix(spans, block_size, width)[valid]
    key_owner = owners.repeat_interleave(keys)
    row_owner = owners.repeat_interleave(lengths)
    row_first = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    row_position = torch.arange(int(lengths.sum())) - row_first + contexts.repeat_interleave(lengths)
    causal = key_position.expand(len(spans), -1)[valid][None, :] <= row_position[:, None]
    mask = (key_owner[None, :] == row_owner[:, None]) & causal
    return AttentionPlan(slots.to(device), mask[None, None].to(device), None, None)


Layout = Literal["auto", "padded", "flat"]


def choose_layout(spans: Sequence[SequenceSpan]) -> Literal["padded", "flat"]:
    """The layout whose score matrix is smaller: ``S * Qmax * Lmax`` against ``T * N``."""
    rows = sum(span.length for span in spans)
    keys = sum(span.keys for span in spans)
    padded_cost = len(spans) * max(span.length for span in spans) * max(span.keys for span in spans)
    return "padded" if len(spans) > 1 and padded_cost < rows * keys else "flat"


def plan_attention(
    spans: Sequence[SequenceSpan], block_size: int, device: torch.device, layout: Layout = "auto"
) -> AttentionPlan:
    """The step's plan; ``spans`` are in batch order and cover the rows ``0 .. T - 1`` exactly once."""
    chosen = choose_layout(spans) if layout == "auto" else layout
    if chosen == "padded":
        return _padded_plan(spans, block_size, device)
    return _flat_plan(spans, block_size, device)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float32 for half-precision queries on CPU: there SDPA in bfloat16 runs 4-7x slower than in float32 at decode
    shapes (32 sequences of 57-300 keys, measured in loadtests/BENCHMARKS.md), casts included; else ``q``'s dtype."""
    return torch.float32 if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else q.dtype


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """``q [T, heads, head_dim]`` against the planned slots of ``k_cache/v_cache [slots, kv_heads, head_dim]``;
    returns ``[T, heads, head_dim]``."""
    entries, queries, width = plan.shape
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    compute = _compute_dtype(q)
    keys = k_cache.index_select(0, plan.key_slots).to(compute)
    values = v_cache.index_select(0, plan.key_slots).to(compute)
    keys = keys.view(entries, width, kv_heads, head_dim).transpose(1, 2)
    values = values.view(entries, width, kv_heads, head_dim).transpose(1, 2)
    query = q.index_select(0, plan.query_rows) if plan.query_rows is not None else q
    query = query.to(compute).view(entries, queries, q.shape[1], head_dim).transpose(1, 2)  # [B, heads, Q, dim]
    attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=plan.mask, enable_gqa=True)
    out = attended.transpose(1, 2).reshape(entries * queries, q.shape[1], head_dim).to(q.dtype)
    if plan.output_rows is not None:
        out = out.index_select(0, plan.output_rows)
    return out


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    spans: Sequence[SequenceSpan],
    block_size: int,
) -> torch.Tensor:
    """The oracle: each sequence's queries against its own keys, causal, softmax written out, in float64."""
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k_cache.shape[1]
    out = torch.empty_like(q)
    for span in spans:
        slots = _slot_matrix([span], block_size, span.keys)[0]
        keys = k_cache[slots].double().repeat_interleave(group, dim=1)  # [L, heads, head_dim]
        values = v_cache[slots].double().repeat_interleave(group, dim=1)
        query = q[span.start : span.start + span.length].double()  # [n, heads, head_dim]
        scores = torch.einsum("nhd,lhd->hnl", query, keys) / head_dim**0.5
        allowed = torch.arange(span.keys)[None, :] <= torch.arange(span.context, span.keys)[:, None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[span.start : span.start + span.length] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values).to(
            q.dtype
        )
    return out
