"""The batched forward pass over a flat batch of tokens from many sequences and many adapters.

One engine step is one call: prefill chunks and decode tokens of every scheduled sequence are concatenated into
``T`` rows (ordered by adapter pool and slot, see :mod:`loraplex.server.lora.mapping`). Every targeted linear is a
:class:`LoraLinear`; attention runs per sequence on in-place views of its KV-cache region. The HF model supplies
the weights and small modules (norms, rotary embedding, activation); the loop itself is ours, gpt-fast style, so
continuous batching needs no padding and no cache re-layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.server.engine.kv_cache import KVCache
from loraplex.server.lora.layers import LoraLinear
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import LoraKernels
from loraplex.server.model.loader import LoadedBase
from loraplex.server.model.shape import ATTENTION_MODULES, MLP_MODULES


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence's rows in this step and its KV-cache region."""

    start: int  # first row in the batch
    end: int  # one past its last row
    cache_start: int  # start of its KV region
    context: int  # tokens already in the cache before this step

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class DecodeGather:
    """Single-token rows attended in one batched call (the CUDA path): their cache positions, padded."""

    rows: torch.Tensor  # [D] long: batch rows of one-token spans
    index: torch.Tensor  # [D, L] long: cache positions of each row's context (padded with its first position)
    mask: torch.Tensor  # [D, 1, 1, L] bool: which of the L positions are real


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long: position of each row in its sequence
    cache_index: torch.Tensor  # [T] long: KV-cache position each row's K/V is written to
    spans: tuple[SequenceSpan, ...]
    sample_rows: torch.Tensor  # [S] long: rows whose next-token logits are wanted
    lora: LoraMapping
    prompt_rows: torch.Tensor | None = None  # [P] long: prompt rows to pool for prompt embeddings
    prompt_owner: torch.Tensor | None = None  # [P] long: index into the pooled sums, per prompt row
    num_pooled: int = 0
    decode: DecodeGather | None = None  # set when one-token spans are attended together


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # [S, vocab] float32
    prompt_hidden_sums: torch.Tensor | None  # [num_pooled, hidden] float32: sums of final hidden states


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
        self.linears: list[dict[str, LoraLinear]] = []
        for index, layer in enumerate(self.layers):
            wrapped = {m: LoraLinear(getattr(layer.self_attn, m), index, m, kernels) for m in ATTENTION_MODULES}
            wrapped |= {m: LoraLinear(getattr(layer.mlp, m), index, m, kernels) for m in MLP_MODULES}
            self.linears.append(wrapped)

    def _attention(self, layer: int, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        gathered = batch.decode
        if gathered is not None:
            keys = self.kv.k[layer][:, gathered.index].transpose(0, 1)  # [D, kv_heads, L, head_dim]
            values = self.kv.v[layer][:, gathered.index].transpose(0, 1)
            query = q.index_select(0, gathered.rows).unsqueeze(2)  # [D, heads, 1, head_dim]
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=gathered.mask, enable_gqa=True)
            out[gathered.rows] = attended.squeeze(2)
        for span in batch.spans:
            if gathered is not None and span.length == 1:
                continue
            rows = slice(span.start, span.end)
            query = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            keys, values = self.kv.view(layer, span.cache_start, span.context + span.length)
            if span.length == 1:
                attended = F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
            elif span.context == 0:
                attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
            else:
                positions = torch.arange(span.context + span.length, device=q.device)
                allowed = positions[None, :] <= (positions[span.context :, None])
                attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, enable_gqa=True)
            out[rows] = attended[0].transpose(0, 1)
        return out

    @torch.inference_mode()
    def __call__(self, batch: StepBatch) -> StepOutput:
        rows = batch.input_ids.shape[0]
        hidden = self.embed(batch.input_ids)  # [T, H]
        cos, sin = self.rotary(hidden, batch.positions.unsqueeze(0))  # [1, T, head_dim]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim]
        mapping = batch.lora
        for index, layer in enumerate(self.layers):
            linear = self.linears[index]
            x = layer.input_layernorm(hidden)
            q = linear["q_proj"](x, mapping).view(rows, self.num_heads, self.head_dim)
            k = linear["k_proj"](x, mapping).view(rows, self.num_kv_heads, self.head_dim)
            v = linear["v_proj"](x, mapping).view(rows, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.kv.write(index, batch.cache_index, k, v)
            attended = self._attention(index, q, batch).reshape(rows, self.num_heads * self.head_dim)
            hidden = hidden + linear["o_proj"](attended, mapping)
            x = layer.post_attention_layernorm(hidden)
            gated = layer.mlp.act_fn(linear["gate_proj"](x, mapping)) * linear["up_proj"](x, mapping)
            hidden = hidden + linear["down_proj"](gated, mapping)
        sums = None
        if batch.prompt_rows is not None and batch.prompt_owner is not None and batch.num_pooled:
            normed = self.norm(hidden.index_select(0, batch.prompt_rows)).float()
            sums = torch.zeros(batch.num_pooled, normed.shape[1], device=normed.device)
            sums.index_add_(0, batch.prompt_owner, normed)
        final = self.norm(hidden.index_select(0, batch.sample_rows))
        logits = self.lm_head(final).float()
        return StepOutput(logits=logits, prompt_hidden_sums=sums)
