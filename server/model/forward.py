"""The batched forward pass over a flat batch of tokens from many sequences and many adapters.

One engine step is one call: prefill chunks and decode tokens of every scheduled sequence are concatenated into
``T`` rows (ordered by adapter pool and slot, see :mod:`loraplex.server.lora.mapping`). Every targeted linear is a
:class:`LoraLinear`; attention is one call per layer over the paged KV cache (:mod:`.attention`). The HF model supplies
the weights and small modules (norms, rotary embedding, activation); the loop itself is ours, gpt-fast style, so
continuous batching needs no padding and no cache re-layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.server.core.shape import ATTENTION_MODULES, MLP_MODULES
from loraplex.server.lora.layers import LoraLinear
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import LoraKernels
from loraplex.server.model.attention import AttentionPlan, attend
from loraplex.server.model.kv_cache import KVCache
from loraplex.server.model.loader import LoadedBase


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
class StepOutput:
    logits: torch.Tensor  # [S, vocab] float32


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
        self.linears: list[dict[str, LoraLinear]] = []
        for index, layer in enumerate(self.layers):
            wrapped = {m: LoraLinear(getattr(layer.self_attn, m), index, m, kernels) for m in ATTENTION_MODULES}
            wrapped |= {m: LoraLinear(getattr(layer.mlp, m), index, m, kernels) for m in MLP_MODULES}
            self.linears.append(wrapped)

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
            attended = attend(q, self.kv.k[index], self.kv.v[index], batch.attention)
            attended = attended.reshape(rows, self.num_heads * self.head_dim)
            hidden = hidden + linear["o_proj"](attended, mapping)
            x = layer.post_attention_layernorm(hidden)
            gated = layer.mlp.act_fn(linear["gate_proj"](x, mapping)) * linear["up_proj"](x, mapping)
            hidden = hidden + linear["down_proj"](gated, mapping)
        if batch.prompt_rows is not None and batch.prompt_blocks is not None and batch.fresh_blocks is not None:
            normed = self.norm(hidden.index_select(0, batch.prompt_rows)).float()
            self.prompt_sums.index_fill_(0, batch.fresh_blocks, 0.0)
            self.prompt_sums.index_add_(0, batch.prompt_blocks, normed)
        final = self.norm(hidden.index_select(0, batch.sample_rows))
        logits = self.lm_head(final).float()
        return StepOutput(logits=logits)

    def prompt_embedding(self, blocks: list[int], prompt_tokens: int) -> tuple[float, ...]:
        """Mean final hidden state over a prompt of ``prompt_tokens`` tokens held in ``blocks`` (its table's
        first blocks): one device → host copy."""
        sums = self.prompt_sums.index_select(0, torch.tensor(blocks, device=self.prompt_sums.device))
        return tuple((sums.sum(0) / prompt_tokens).tolist())
