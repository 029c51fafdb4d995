"""The batched forward pass over a flat batch of tokens from many sequences and many adapters.

One engine step is one call: prefill chunks and decode tokens of every scheduled sequence are concatenated into
``T`` rows (ordered by adapter pool and slot, see :mod:`loraplex.server.lora.mapping`). The targeted linears run as
:class:`LoraProjection` s, those sharing an input together (q/k/v, gate/up: one merged LoRA launch pair per pool
where the Triton kernels serve the segment); attention is one call per layer over the paged KV cache
(:mod:`.attention`). The HF model supplies the weights and small modules (norms, rotary embedding, activation); the
loop itself is ours, gpt-fast style, so continuous batching needs no padding and no cache re-layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.server.core.shape import ATTENTION_MODULES
from loraplex.server.lora.layers import PROJECTIONS, LoraLinear, LoraProjection
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import LoraKernels
from loraplex.server.lora.pool import SlotPool
from loraplex.server.model.attention import AttentionPlan, attend
from loraplex.server.model.kv_cache import KVCache
from loraplex.server.model.loader import LoadedBase
from loraplex.server.model.paged_attention import DecodeAttention


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long: position of each row in its sequence
    cache_index: torch.Tensor  # [T] long: KV-cache slot each row's K/V is written to
    attention: AttentionPlan
    sample_rows: torch.Tensor  # [S] long: rows whose next-token logits are wanted
    lora: LoraMapping
    prompt_rows: torch.Tensor | None = None  # [P] long: prompt rows to pool for prompt embeddings
    prompt_blocks: torch.Tensor | None = None  # [P] long: the KV block of each prompt row (its sum's row)
    fresh_blocks: torch.Tensor | None = None  # [F] long: blocks whose first prompt row is in this step (zeroed first)


@dataclass(frozen=True)
class StaticDecode:
    """The inputs of a static-shape decode step: one row per sequence (padded rows included), fixed sizes."""

    input_ids: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long
    cache_slots: torch.Tensor  # [B] long: where each row's K/V is written (padded rows: a scratch slot)
    block_tables: torch.Tensor  # [B, W] int32
    seq_lens: torch.Tensor  # [B] int32: keys of each row after its write
    lora: tuple[tuple[SlotPool, torch.Tensor], ...]  # per pool of the step: [B] row slots, -1 = not this pool


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # [S, vocab] float32


Project = Callable[[LoraProjection, torch.Tensor], list[torch.Tensor]]  # the outputs of linears sharing one input
AttendLayer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderForward:
    """Runs :class:`StepBatch` es through a Llama-style decoder with batched multi-adapter LoRA."""

    def __init__(self, base: LoadedBase, kv_cache: KVCache, kernels: LoraKernels) -> None:
        self.base = base
        self.kv = kv_cache
        self.kernels = kernels
        shape = base.shape
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        inner = base.model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = base.model.lm_head
        self.layers = list(inner.layers)
        # [num_blocks, hidden] float32: per KV block, the sum of its prompt rows' final (normed) hidden states, kept
        # with the block so that a prefix-cache hit still yields the whole prompt's mean-pooled embedding
        self.prompt_sums = torch.zeros(kv_cache.num_blocks, shape.hidden_size, device=base.device)
        # per layer, by the first module of each group of PROJECTIONS: q_proj (q/k/v), o_proj, gate_proj (gate/up),
        # down_proj
        self.projections: list[dict[str, LoraProjection]] = []
        for index, layer in enumerate(self.layers):
            linears = {
                m: LoraLinear(getattr(layer.self_attn if m in ATTENTION_MODULES else layer.mlp, m), index, m)
                for group in PROJECTIONS
                for m in group
            }
            self.projections.append(
                {group[0]: LoraProjection([linears[m] for m in group], kernels) for group in PROJECTIONS}
            )

    def _decoder(
        self, input_ids: torch.Tensor, positions: torch.Tensor, project: Project, attend_layer: AttendLayer
    ) -> torch.Tensor:
        """The layers over ``T`` rows: ``project(projection, x)`` runs the (LoRA-aware) linears that share the input
        ``x``, ``attend_layer(layer, q, k, v)`` writes the rows' K/V and attends; returns the last hidden states
        ``[T, H]`` (before the final norm)."""
        rows = input_ids.shape[0]
        hidden: torch.Tensor = self.embed(input_ids)  # [T, H]
        cos, sin = self.rotary(hidden, positions.unsqueeze(0))  # [1, T, head_dim]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim]
        for index, layer in enumerate(self.layers):
            projections = self.projections[index]
            x = layer.input_layernorm(hidden)
            q, k, v = project(projections["q_proj"], x)
            q = q.view(rows, self.num_heads, self.head_dim)
            k = k.view(rows, self.num_kv_heads, self.head_dim)
            v = v.view(rows, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            attended = attend_layer(index, q, k, v).reshape(rows, self.num_heads * self.head_dim)
            hidden = hidden + project(projections["o_proj"], attended)[0]
            x = layer.post_attention_layernorm(hidden)
            gate, up = project(projections["gate_proj"], x)
            hidden = hidden + project(projections["down_proj"], layer.mlp.act_fn(gate) * up)[0]
        return hidden

    @torch.inference_mode()
    def __call__(self, batch: StepBatch) -> StepOutput:
        mapping = batch.lora

        def project(projection: LoraProjection, x: torch.Tensor) -> list[torch.Tensor]:
            return projection(x, mapping)

        def attend_layer(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv.write(index, batch.cache_index, k, v)
            return attend(q, self.kv.k[index], self.kv.v[index], batch.attention)

        hidden = self._decoder(batch.input_ids, batch.positions, project, attend_layer)
        if batch.prompt_rows is not None and batch.prompt_blocks is not None and batch.fresh_blocks is not None:
            normed = self.norm(hidden.index_select(0, batch.prompt_rows)).float()
            self.prompt_sums.index_fill_(0, batch.fresh_blocks, 0.0)
            self.prompt_sums.index_add_(0, batch.prompt_blocks, normed)
        final = self.norm(hidden.index_select(0, batch.sample_rows))
        logits = self.lm_head(final).float()
        return StepOutput(logits=logits)

    def decode_static(self, step: StaticDecode, attention: DecodeAttention) -> torch.Tensor:
        """The static-shape decode step (:mod:`.decode_graphs` captures it): one row per sequence, every tensor of
        a fixed size, no host sync; each pool's LoRA through ``lora_add_rows_slices`` over all rows (``-1`` = none);
        returns float32 logits of every row ``[B, vocab]``. Call it under ``torch.inference_mode``."""

        def project(projection: LoraProjection, x: torch.Tensor) -> list[torch.Tensor]:
            return projection.rows(x, step.lora)

        def attend_layer(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv.write(index, step.cache_slots, k, v)
            k_cache, v_cache = self.kv.k[index], self.kv.v[index]
            return attention(q, k_cache, v_cache, step.block_tables, step.seq_lens, self.kv.block_size)

        hidden = self._decoder(step.input_ids, step.positions, project, attend_layer)
        logits: torch.Tensor = self.lm_head(self.norm(hidden)).float()
        return logits

    def prompt_embedding(self, blocks: list[int], prompt_tokens: int) -> tuple[float, ...]:
        """Mean final hidden state over a prompt of ``prompt_tokens`` tokens held in ``blocks`` (its table's
        first blocks): one device → host copy."""
        sums = self.prompt_sums.index_select(0, torch.tensor(blocks, device=self.prompt_sums.device))
        return tuple((sums.sum(0) / prompt_tokens).tolist())
