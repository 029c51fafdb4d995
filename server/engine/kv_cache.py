"""The KV cache: per-layer K/V buffers, each sequence owning one contiguous region of token positions.

Layout per layer: ``k[layer]`` and ``v[layer]`` are ``[num_kv_heads, capacity, head_dim]``. A sequence reserves
``prompt + max_new_tokens`` positions when it is admitted, so it can never run out of cache mid-generation, and its
keys are a *view* ``k[layer][:, start:start + length]``: attention reads them in place, with no gather (on CPU a
gather of paged blocks cost more than the attention itself). The capacity is ``engine.kv_cache_tokens``; when no
region fits, the scheduler keeps the request waiting (and compacts if fragmentation is the only obstacle).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


class RegionAllocator:
    """First-fit allocator of contiguous ranges in ``[0, capacity)``, merging neighbours on free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[Region] = [Region(0, capacity)]  # sorted by start, never adjacent
        self.used = 0

    def allocate(self, length: int) -> Region | None:
        for index, hole in enumerate(self._free):
            if hole.length >= length:
                if hole.length == length:
                    del self._free[index]
                else:
                    self._free[index] = Region(hole.start + length, hole.length - length)
                self.used += length
                return Region(hole.start, length)
        return None

    def free(self, region: Region) -> None:
        starts = [hole.start for hole in self._free]
        index = bisect.bisect_left(starts, region.start)
        merged = region
        if index < len(self._free) and self._free[index].start == merged.end:
            merged = Region(merged.start, merged.length + self._free[index].length)
            del self._free[index]
        if index > 0 and self._free[index - 1].end == merged.start:
            merged = Region(self._free[index - 1].start, self._free[index - 1].length + merged.length)
            index -= 1
            del self._free[index]
        self._free.insert(index, merged)
        self.used -= region.length

    @property
    def free_tokens(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max((hole.length for hole in self._free), default=0)

    def reset_packed(self, used: int) -> None:
        """After compaction: everything below ``used`` is taken, the rest is one hole."""
        self.used = used
        self._free = [Region(used, self.capacity - used)] if used < self.capacity else []


class KVCache:
    """K and V buffers of every layer plus the region allocator that shares them out."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = RegionAllocator(capacity)

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def usage(self) -> float:
        return self.allocator.used / self.allocator.capacity

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def write(self, layer: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores new tokens: ``index [T]`` cache positions, ``keys/values [T, kv_heads, head_dim]``."""
        self.k[layer].index_copy_(1, index, keys.transpose(0, 1))
        self.v[layer].index_copy_(1, index, values.transpose(0, 1))

    def view(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[1, kv_heads, length, head_dim]`` views of a region's first ``length`` positions."""
        end = start + length
        return self.k[layer][None, :, start:end], self.v[layer][None, :, start:end]

    def compact(self, regions: list[Region]) -> list[Region]:
        """Moves the live ``regions`` to the front, in order of their starts; returns their new places."""
        moved: list[Region] = []
        cursor = 0
        for region in sorted(regions, key=lambda r: r.start):
            if region.start != cursor:
                for buffers in (self.k, self.v):
                    for buffer in buffers:
                        buffer[:, cursor : cursor + region.length] = buffer[:, region.start : region.end].clone()
            moved.append(Region(cursor, region.length))
            cursor += region.length
        self.allocator.reset_packed(cursor)
        order = sorted(range(len(regions)), key=lambda i: regions[i].start)
        result: list[Region] = [Region(0, 0)] * len(regions)
        for new, original_index in zip(moved, order, strict=True):
            result[original_index] = new
        return result
