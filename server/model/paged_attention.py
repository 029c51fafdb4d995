"""Paged attention that reads the KV blocks in place: a Triton kernel, a static-shape torch form, and the choice.

Both read ``k_cache/v_cache [slots, kv_heads, head_dim]`` (one layer of :class:`~.kv_cache.KVCache`) through a
block table ``[S, max_blocks]`` (int32; row ``i`` is sequence ``i``'s :attr:`blocks`, any valid block past its end)
and ``seq_lens [S]`` (int32: keys each sequence holds *after* this step's rows were written). Semantics::

    for sequence i with rows query_start[i] .. query_start[i+1]-1 (n rows), L = seq_lens[i], context = L - n:
        row j of it is at position context + j and reads keys 0 .. context + j (causal, itself included),
        key p living in slot block_tables[i, p // block_size] * block_size + p % block_size
    softmax(q k^T / sqrt(head_dim)) v per query head; query head h reads kv head h // (heads // kv_heads) (GQA);
    a sequence with L == 0 yields zeros (the padded rows of a static decode step; their output is dropped)

* :func:`paged_attention_triton`: the Triton kernel, for decode rows (one query per sequence,
  :func:`paged_decode_attention_triton`) and causal varlen prefill chunks alike. One program per (sequence, block of
  queries, kv head) runs an online softmax over tiles of keys, each key's slot looked up in the block table (no
  gather of K/V into a copy), float32 accumulation, float32/bfloat16/float16 caches. Its grid and arguments depend
  only on the batch size (the loop bound is read on the device), so it can be captured in a CUDA graph. On CUDA
  tensors it is compiled; CPU tensors need Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first
  imported), which is how the tests check it on CPU (in a subprocess).
* :func:`paged_decode_attention_torch`: the same decode interface in torch: the table's slots gathered at its full
  static width and one masked ``scaled_dot_product_attention`` (attention.py's padded layout with no
  data-dependent shape). The CPU form of the static decode step, and the CUDA fallback.
* :func:`choose_decode_attention`: the start-up calibration on CUDA: every candidate that runs and matches the torch
  form is timed at two decode shapes of the engine's own sizes (well under a second after each one's first call,
  whose cost is logged too) and the fastest is used. Candidates: the Triton kernel and the torch form (SDPA over
  the gathered slots). Named by the issue but not candidates yet: FlashInfer (``flashinfer-python``, not installed:
  it JIT-compiles on first use and needs a GPU to measure) and ``flex_attention`` (its paged form is torch's private
  ``experimental._paged_attention`` and needs ``torch.compile`` per shape); both want a measurement on a GPU first.
  On CPU the torch form is used without timing (the interpreter is for tests).

``reference_attention`` in :mod:`.attention` is the oracle of both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(q [S, heads, head_dim], k_cache, v_cache, block_tables [S, W], seq_lens [S], block_size) -> [S, heads, dim]``"""


@triton.jit  # type: ignore[untyped-decorator]
def _paged_attention_kernel(  # type: ignore[no-untyped-def]  # constexpr names upper case: noqa N803 below
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_table,
    scale,
    GROUP: tl.constexpr,  # noqa: N803 -- query heads per kv head
    BLOCK_G: tl.constexpr,  # noqa: N803 -- GROUP rounded up to a power of two
    BLOCK_M: tl.constexpr,  # noqa: N803 -- query rows per program
    BLOCK_N: tl.constexpr,  # noqa: N803 -- keys per tile
    HEAD_DIM: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr,  # noqa: N803 -- HEAD_DIM rounded up to a power of two
    KV_BLOCK: tl.constexpr,  # noqa: N803 -- the cache's block size
    UPCAST: tl.constexpr,  # noqa: N803 -- float32 dots (interpreted bf16: its bf16 dot reads raw bits)
):
    seq = tl.program_id(0)
    query_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    # row r of the tile: query query_block * BLOCK_M + r // BLOCK_G of the sequence, head r % BLOCK_G of the group
    r = tl.arange(0, BLOCK_M * BLOCK_G)
    query = query_block * BLOCK_M + r // BLOCK_G
    group = r % BLOCK_G
    row_ok = (query < q_len) & (group < GROUP)
    head = kv_head * GROUP + group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_offsets = (q_start + query).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    position = context + query
    best = tl.full((BLOCK_M * BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M * BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_M * BLOCK_G, BLOCK_D), tl.float32)
    keys_end = tl.minimum(seq_len, context + (query_block + 1) * BLOCK_M)
    for first in range(0, keys_end, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        n_ok = n < keys_end
        block = tl.load(tables_ptr + seq * stride_table + n // KV_BLOCK, mask=n_ok, other=0)
        slot = block.to(tl.int64) * KV_BLOCK + n % KV_BLOCK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        allowed = n_ok[None, :] & (n[None, :] <= position[:, None]) & row_ok[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # rows with no key yet: no NaN
        weights = tl.exp(scores - shift[:, None])
        correction = tl.exp(best - shift)
        total = total * correction + tl.sum(weights, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        best = new_best
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    o_offsets = (q_start + query).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_MIN_DOT = 16  # tl.dot wants every dimension at least this


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    max_query_len: int,
    block_size: int,
) -> torch.Tensor:
    """``q [T, heads, head_dim]``, the rows of sequence ``i`` at ``query_start[i] .. query_start[i + 1] - 1``
    (``query_start [S + 1]`` int32, ``max_query_len`` the most rows of one sequence) → ``[T, heads, head_dim]``."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    if heads % kv_heads or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("heads must be a multiple of kv_heads and the caches contiguous in head_dim")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q)
    group = heads // kv_heads
    block_g = triton.next_power_of_2(group)
    block_m = 1 if max_query_len == 1 else _MIN_DOT
    block_g = max(block_g, -(-_MIN_DOT // block_m))  # the tile has at least _MIN_DOT rows
    sequences = block_tables.shape[0]
    grid = (sequences, -(-max(max_query_len, 1) // block_m), kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        head_dim**-0.5,
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_M=block_m,
        BLOCK_N=max(_MIN_DOT, min(64, triton.next_power_of_2(block_size))),
        HEAD_DIM=head_dim,
        BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(head_dim)),
        KV_BLOCK=block_size,
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
    )
    return out


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Decode rows (row ``i`` is sequence ``i``'s one query) by the Triton kernel; a :data:`DecodeAttention`."""
    query_start = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start, 1, block_size)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Decode rows in torch at static shapes: every table slot gathered (``W * block_size`` keys per row), keys past
    ``seq_lens`` masked (key 0 always allowed, so no row is NaN; rows with ``seq_lens == 0`` are zeroed); float32
    on CPU (as attention.py), else in ``q``'s dtype. A :data:`DecodeAttention`."""
    rows, width = block_tables.shape
    head_dim, kv_heads = q.shape[2], k_cache.shape[1]
    keys_per_row = width * block_size
    offsets = torch.arange(block_size, device=q.device)
    slots = (block_tables.long().unsqueeze(-1) * block_size + offsets).view(-1)  # [S * W * block_size]
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    keys = k_cache.index_select(0, slots).to(compute).view(rows, keys_per_row, kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, slots).to(compute).view(rows, keys_per_row, kv_heads, head_dim).transpose(1, 2)
    position = torch.arange(keys_per_row, device=q.device)
    mask = (position < seq_lens.unsqueeze(1)) | (position == 0)  # [S, keys]
    query = q.to(compute).unsqueeze(2)  # [S, heads, 1, head_dim]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True)
    out = out.squeeze(2) * (seq_lens > 0).to(compute)[:, None, None]
    return out.to(q.dtype)


@dataclass(frozen=True)
class DecodeAttentionChoice:
    name: str
    attend: DecodeAttention
    timings_ms: dict[str, float]  # candidate -> mean time of one call over the calibration shapes; empty on CPU


CANDIDATES: dict[str, DecodeAttention] = {
    "triton": paged_decode_attention_triton,
    "sdpa-gather": paged_decode_attention_torch,
}


def _decode_case(
    rows: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step of ``rows`` sequences with scattered blocks and contexts up to the table's capacity."""
    generator = torch.Generator(device=device).manual_seed(0)
    blocks = rows * width + 1
    q = torch.randn(rows, heads, head_dim, generator=generator, device=device, dtype=dtype)
    k = torch.randn(blocks * block_size, kv_heads, head_dim, generator=generator, device=device, dtype=dtype)
    v = torch.randn(blocks * block_size, kv_heads, head_dim, generator=generator, device=device, dtype=dtype)
    tables = torch.randperm(blocks - 1, generator=generator, device=device)[: rows * width].view(rows, width)
    capacity = width * block_size
    lens = torch.randint(1, capacity + 1, (rows,), generator=generator, device=device)
    return q, k, v, tables.to(torch.int32), lens.to(torch.int32)


def choose_decode_attention(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    table_blocks: int,
    rows: tuple[int, ...] = (8, 64),
    repeats: int = 5,
) -> DecodeAttentionChoice:
    """The decode attention of a static step on ``device``: on CUDA the fastest candidate that runs and agrees with
    the torch form, timed at ``rows`` sequences of the engine's table width (capped at 64 blocks); the torch form on
    CPU. Logs the timings and the choice."""
    if device.type != "cuda":
        return DecodeAttentionChoice("sdpa-gather", paged_decode_attention_torch, {})
    width = min(table_blocks, 64)
    cases = [_decode_case(n, heads, kv_heads, head_dim, block_size, width, dtype, device) for n in rows]
    want = [paged_decode_attention_torch(*case, block_size).float() for case in cases]
    timings: dict[str, float] = {}
    for name, attend in CANDIDATES.items():
        try:
            started = time.perf_counter()
            got = [attend(*case, block_size).float() for case in cases]
            torch.cuda.synchronize(device)
            first_call = time.perf_counter() - started
            if not all(torch.allclose(g, w, rtol=2e-2, atol=2e-2) for g, w in zip(got, want, strict=True)):
                log.warning("decode attention %s disagrees with the torch form: not used", name)
                continue
            begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            begin.record()
            for _ in range(repeats):
                for case in cases:
                    attend(*case, block_size)
            end.record()
            torch.cuda.synchronize(device)
            timings[name] = begin.elapsed_time(end) / (repeats * len(cases))
            log.info("decode attention %s: first call %.2f s, %.3f ms per call", name, first_call, timings[name])
        except Exception as exc:  # a candidate that does not build or run here is not a candidate
            log.warning("decode attention %s unavailable on %s: %s", name, device, exc)
    best = min(timings, key=timings.__getitem__, default="sdpa-gather")
    log.info("decode attention for the static decode step: %s (%s)", best, timings)
    return DecodeAttentionChoice(best, CANDIDATES[best], timings)
