"""The per-step LoRA mapping: which rows of the flat token batch use which pool slot.

Built once per engine step and passed explicitly down the forward pass. The scheduler orders sequences by
(pool, slot), so every pool's tokens form one contiguous row range, sorted by slot: exactly the layout the grouped
matmuls in :mod:`loraplex.server.lora.ops` want. Rows outside every segment run the base model alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.server.lora.ops import PADDED_MAX_ROWS_PER_ROW, WINDOW_MAX_WIDTH_PER_ROW, PaddedGroups, SlotWindow
from loraplex.server.lora.pool import SlotPool


@dataclass(frozen=True)
class LoraSegment:
    pool: SlotPool
    start: int  # first row of the pool's tokens in the step batch
    end: int  # one past the last row
    slots: torch.Tensor  # [end - start] long: slot of each row (non-decreasing)
    group_ends: torch.Tensor  # [pool.capacity] int32: one past the last row (relative to start) of each slot
    groups: int  # distinct slots among the rows
    window: SlotWindow | None  # set when every row has its own slot, in a narrow window (the window kernel)
    window_offsets: torch.Tensor | None  # [end - start] long: each row's slot - window.first (the fused kernel)
    padded: PaddedGroups | None = None  # set when the rows come in groups that pad into a small [width, depth]


def _window(slots: list[int], device: torch.device) -> SlotWindow | None:
    """The slot window of a segment whose (sorted) rows each have their own slot, if it is narrow enough."""
    first, last = slots[0], slots[-1]
    width = last - first + 1
    if len(set(slots)) != len(slots) or width > WINDOW_MAX_WIDTH_PER_ROW * len(slots):
        return None
    if width == len(slots):
        return SlotWindow(first, width, None)
    return SlotWindow(first, width, torch.tensor([s - first for s in slots], dtype=torch.long, device=device))


def _padded(slots: list[int], counts: list[int], device: torch.device) -> PaddedGroups | None:
    """The padded layout of a segment (sorted rows) with several rows per slot, if padding every slot's group to
    the deepest, over the window of its slots, costs at most :data:`PADDED_MAX_ROWS_PER_ROW` rows per row."""
    first, last = slots[0], slots[-1]
    width, depth = last - first + 1, max(counts)
    if depth < 2 or width * depth > PADDED_MAX_ROWS_PER_ROW * len(slots):
        return None
    index: list[int] = []
    group_start = 0
    for row, slot in enumerate(slots):
        if row and slot != slots[row - 1]:
            group_start = row
        index.append((slot - first) * depth + row - group_start)
    return PaddedGroups(first, width, depth, torch.tensor(index, dtype=torch.long, device=device))


def _offsets(window: SlotWindow | None, rows: int, device: torch.device) -> torch.Tensor | None:
    if window is None:
        return None
    return window.local if window.local is not None else torch.arange(rows, device=device)


@dataclass(frozen=True)
class LoraMapping:
    segments: tuple[LoraSegment, ...]

    @classmethod
    def build(cls, row_slots: Sequence[tuple[SlotPool, int, int]], device: torch.device) -> LoraMapping:
        """``row_slots``: per LoRA row range ``(pool, slot, n_rows)`` in batch order, ranges already grouped by pool
        and sorted by slot inside a pool; the ranges start at row 0 and are contiguous."""
        segments: list[LoraSegment] = []
        row = 0
        index = 0
        while index < len(row_slots):
            pool = row_slots[index][0]
            start = row
            counts = [0] * pool.capacity
            slots: list[int] = []
            while index < len(row_slots) and row_slots[index][0] is pool:
                _, slot, n_rows = row_slots[index]
                counts[slot] += n_rows
                slots.extend([slot] * n_rows)
                row += n_rows
                index += 1
            ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
            window = _window(slots, device)
            segments.append(
                LoraSegment(
                    pool=pool,
                    start=start,
                    end=row,
                    slots=torch.tensor(slots, dtype=torch.long, device=device),
                    group_ends=ends.to(device),
                    groups=sum(1 for count in counts if count),
                    window=window,
                    window_offsets=_offsets(window, len(slots), device),
                    padded=None if window is not None else _padded(slots, counts, device),
                )
            )
        return cls(tuple(segments))

    @classmethod
    def empty(cls) -> LoraMapping:
        return cls(())
