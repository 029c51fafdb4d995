"""CUDA graphs for decode: a static-shape decode step per batch-size bucket, captured on CUDA, eager on CPU.

A decode-only step (one row per sequence, every row past its prompt) is padded up to the next bucket (1, 2, 4, 8,
... up to the engine's most decode rows, that number itself last). Its inputs travel in one static ``int64``
buffer per captured graph, ``[B, 4 + P + W]``: token id, position, cache slot, keys after the write, one column of
row slots per LoRA pool of the step (``-1`` = the row has no adapter of that pool; base rows have ``-1``
everywhere), then the block table (``W`` = blocks of ``engine.max_seq_len``). One host → device copy fills it, the
graph unpacks it and runs :meth:`DecoderForward.decode_static` (``lora_add_rows_slices`` per pool and projection,
the chosen paged decode attention of :mod:`.paged_attention`), and the logits of the real rows are read from its
static output.
Padded rows read token 0 at position 0, write their K/V to a scratch block taken from the KV cache for good
(so ``kv_cache_usage_ratio`` counts one block more) and read only it; their logits are dropped. The host buffer is
written in place through a numpy view, and a row's block table only where it grew since the last step (a row that
keeps its sequence's table list appends its new blocks; columns past a row's table keep stale but valid block ids,
which no row reads: its ``seq_lens`` stops it). On CPU the step reads only the table columns its longest row uses.

On CUDA a graph is captured per (bucket, the step's pools) on first use: two warm-up runs on a side stream with
every row padded (only the scratch block is written), then capture into one memory pool shared by all graphs. A
graph remembers (weakly, so a dropped pool's stacks are freed) the pools' stack tensors it was captured over; a
pool whose stacks were reallocated since (grown, cut) gets a new capture, and captures over freed stacks are
dropped. On CPU the same static step runs eagerly (what makes it testable here). ``engine.cuda_graphs``
(:func:`graphs_wanted`) turns it on: ``auto`` on CUDA only.

Steps the caller keeps on the eager :class:`DecoderForward` path (:meth:`DecodeGraphs.accepts` says no): any prefill
chunk or prompt row (not built as :class:`DecodeRows`), more rows than the largest bucket, a block table wider than
``W``, a DoRA pool among the step's adapters, and on CUDA a (bucket, pools) whose capture failed (logged once;
:meth:`DecodeGraphs.run` returns None for the step whose capture failed, so it too runs eagerly).
Structured output is not a fallback: constraints apply in the sampler, after these logits.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from loraplex.server.lora.pool import SlotPool
from loraplex.server.model.forward import DecoderForward, StaticDecode
from loraplex.server.model.paged_attention import DecodeAttention

log = logging.getLogger(__name__)

_FIXED_COLUMNS = 4  # token, position, cache slot, keys after the write
MAX_GRAPHS = 64  # captures kept before all are dropped and recaptured as used


def graphs_wanted(setting: Literal["auto", "on", "off"], device: torch.device) -> bool:
    """Whether the engine runs decode-only steps through :class:`DecodeGraphs`: ``auto`` where ``device`` is CUDA
    (on CPU the eager step is faster: measured in loadtests/BENCHMARKS.md)."""
    return device.type == "cuda" if setting == "auto" else setting == "on"


def decode_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two below ``max_rows``, then ``max_rows``."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return (*buckets, max_rows)


@dataclass(frozen=True)
class DecodeRows:
    """One decode-only step on the host, one row per sequence in batch order."""

    input_ids: Sequence[int]
    positions: Sequence[int]
    cache_slots: Sequence[int]
    block_tables: Sequence[Sequence[int]]
    adapters: Sequence[tuple[SlotPool, int] | None]  # (pool, slot) of each row's adapter; None = base row

    def pools(self) -> tuple[SlotPool, ...]:
        """The step's pools, in order of first appearance."""
        seen: dict[int, SlotPool] = {}
        for adapter in self.adapters:
            if adapter is not None:
                seen.setdefault(id(adapter[0]), adapter[0])
        return tuple(seen.values())


def _first_stack(pool: SlotPool) -> torch.Tensor:
    """A tensor every reallocation of the pool replaces (all its stacks are replaced together)."""
    return pool.a[pool.key.modules[0]][0]


@dataclass(eq=False)
class _Static:
    """One bucket and pool set: its input buffers, output and (on CUDA) graph."""

    stacks: tuple[weakref.ref[torch.Tensor], ...]  # _first_stack of each pool at capture
    host: torch.Tensor  # [B, columns] int64 (pinned on CUDA)
    staging: torch.Tensor  # the same on the device (the host buffer itself on CPU)
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    failed: bool = False
    filled: int = 0  # real rows the host buffer holds (rows past them hold padding)
    tables: list[tuple[Sequence[int] | None, int]] = field(default_factory=list)  # per row: table list, blocks written

    def current(self, pools: tuple[SlotPool, ...]) -> bool:
        return all(_first_stack(p) is s() for p, s in zip(pools, self.stacks, strict=True))

    def alive(self) -> bool:
        return all(s() is not None for s in self.stacks)


class DecodeGraphs:
    """Static decode steps over ``forward`` for up to ``max_rows`` rows; ``capture``: CUDA graphs (else eager)."""

    def __init__(self, forward: DecoderForward, max_rows: int, max_seq_len: int, attention: DecodeAttention) -> None:
        self.forward = forward
        self.attention = attention
        kv = forward.kv
        self.device = kv.k[0].device
        self.capture = self.device.type == "cuda"
        self.buckets = decode_buckets(max_rows)
        self.width = kv.blocks_for(max_seq_len)
        scratch = kv.allocator.allocate(1)
        if not scratch:
            raise ValueError("the KV cache has no block left for the decode step's scratch block")
        self.scratch_block = scratch[0]
        self._statics: dict[tuple[int, tuple[int, ...]], _Static] = {}
        self._memory = torch.cuda.graph_pool_handle() if self.capture else None
        self.captures = 0  # graphs captured since start (tests and logs)
        self.steps = 0  # steps run by the static path since start

    def describe(self) -> str:
        how = "CUDA graphs" if self.capture else "run eagerly"
        buckets = ",".join(map(str, self.buckets))
        return f"static decode step ({how}) over buckets {buckets}: {self.steps} steps, {self.captures} captures"

    def accepts(self, rows: DecodeRows) -> bool:
        if not rows.input_ids or len(rows.input_ids) > self.buckets[-1]:
            return False
        if any(len(table) > self.width for table in rows.block_tables):
            return False
        pools = rows.pools()
        if any(pool.key.dora for pool in pools):
            return False
        static = self._statics.get(self._key(len(rows.input_ids), pools))
        return static is None or not static.failed

    def _bucket(self, rows: int) -> int:
        return next(size for size in self.buckets if size >= rows)

    def _key(self, rows: int, pools: tuple[SlotPool, ...]) -> tuple[int, tuple[int, ...]]:
        return self._bucket(rows), tuple(id(pool) for pool in pools)

    def _padding(self, columns: int) -> list[int]:
        scratch = self.scratch_block
        pools = columns - _FIXED_COLUMNS - self.width
        return [0, 0, scratch * self.forward.kv.block_size, 1, *([-1] * pools), *([scratch] * self.width)]

    def _new_static(self, bucket: int, pools: tuple[SlotPool, ...]) -> _Static:
        columns = _FIXED_COLUMNS + len(pools) + self.width
        host = torch.tensor([self._padding(columns)] * bucket, dtype=torch.long)
        if self.capture:
            host = host.pin_memory()
        staging = host.to(self.device) if self.capture else host
        return _Static(tuple(weakref.ref(_first_stack(p)) for p in pools), host, staging, tables=[(None, 0)] * bucket)

    def _body(self, static: _Static, pools: tuple[SlotPool, ...], width: int) -> torch.Tensor:
        staging, start = static.staging, _FIXED_COLUMNS + len(pools)
        step = StaticDecode(
            input_ids=staging[:, 0].contiguous(),
            positions=staging[:, 1].contiguous(),
            cache_slots=staging[:, 2].contiguous(),
            seq_lens=staging[:, 3].to(torch.int32),
            lora=tuple((pool, staging[:, _FIXED_COLUMNS + i].contiguous()) for i, pool in enumerate(pools)),
            block_tables=staging[:, start : start + width].to(torch.int32),
        )
        return self.forward.decode_static(step, self.attention)

    def _capture(self, static: _Static, pools: tuple[SlotPool, ...]) -> None:
        """Warm-up and capture with every row padded (the staging holds padding until the first real step)."""
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(static, pools, self.width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory):
            static.logits = self._body(static, pools, self.width)
        static.graph = graph
        self.captures += 1

    def _static_for(self, rows: DecodeRows, pools: tuple[SlotPool, ...]) -> _Static:
        key = self._key(len(rows.input_ids), pools)
        static = self._statics.get(key)
        if static is not None and static.current(pools):
            return static
        if len(self._statics) >= MAX_GRAPHS:
            self._statics.clear()
        for stale in [k for k, s in self._statics.items() if not s.alive()]:  # over stacks freed since
            del self._statics[stale]
        static = self._statics[key] = self._new_static(key[0], pools)
        if self.capture:
            try:
                self._capture(static, pools)
            except Exception:
                static.failed = True
                log.exception("CUDA graph capture of a %d-row decode step failed: eager for it from now on", key[0])
        return static

    def _fill(self, static: _Static, rows: DecodeRows, pools: tuple[SlotPool, ...]) -> int:
        """Writes the step's rows into the host buffer in place; returns the table columns its longest row uses."""
        count, host = len(rows.input_ids), static.host.numpy()
        positions = np.asarray(rows.positions, dtype=np.int64)
        host[:count, 0] = rows.input_ids
        host[:count, 1] = positions
        host[:count, 2] = rows.cache_slots
        host[:count, 3] = positions + 1
        start = _FIXED_COLUMNS + len(pools)
        host[:count, _FIXED_COLUMNS:start] = -1
        column = {id(pool): _FIXED_COLUMNS + i for i, pool in enumerate(pools)}
        for i, adapter in enumerate(rows.adapters):
            if adapter is not None:
                host[i, column[id(adapter[0])]] = adapter[1]
        width = 1
        for i, blocks in enumerate(rows.block_tables):
            kept, written = static.tables[i]
            size = len(blocks)
            if kept is not blocks or size < written:
                written = 0
            if size > written:
                host[i, start + written : start + size] = blocks[written:]
            static.tables[i] = (blocks, size)
            width = max(width, size)
        if static.filled > count:
            host[count : static.filled] = self._padding(host.shape[1])
            static.tables[count : static.filled] = [(None, 0)] * (static.filled - count)
        static.filled = count
        return width

    @torch.inference_mode()
    def run(self, rows: DecodeRows) -> torch.Tensor | None:
        """Float32 logits ``[len(rows), vocab]`` of a step :meth:`accepts` took; None when its capture failed just
        now (the caller runs it eagerly, as every later step of that bucket and pool set)."""
        pools = rows.pools()
        static = self._static_for(rows, pools)
        if static.failed:
            return None
        width = self._fill(static, rows, pools)
        count = len(rows.input_ids)
        self.steps += 1
        if static.graph is not None and static.logits is not None:
            static.staging.copy_(static.host, non_blocking=True)
            static.graph.replay()
            return static.logits[:count]
        return self._body(static, pools, width)[:count]
