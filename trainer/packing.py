"""Rows and batches: one example per row, or several packed into each ``max_length`` row.

Packing is best-fit decreasing over example lengths (deterministic; no example is split). A packed row carries
``position_ids`` that restart at 0 for each example and no attention mask: transformers then builds a
block-diagonal causal mask from the restarts, so packed examples never attend to each other. The padding at the
end of a packed row is a segment of its own with masked labels. Unpacked batches are right-padded with an
attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.trainer.encode import IGNORE, Encoded


@dataclass(frozen=True)
class Row:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]
    num_targets: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE where no loss
    attention_mask: torch.Tensor | None  # [B, T] long; None for packed batches
    position_ids: torch.Tensor | None  # [B, T] long; restarting per packed example
    num_tokens: int  # real (non-padding) tokens
    num_targets: int  # positions with a loss

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            move(self.attention_mask),
            move(self.position_ids),
            self.num_tokens,
            self.num_targets,
        )


def single_rows(examples: Sequence[Encoded]) -> list[Row]:
    return [Row(e.input_ids, e.labels, tuple(range(len(e.input_ids))), e.num_targets) for e in examples if e.input_ids]


def pack_rows(examples: Sequence[Encoded], max_length: int) -> list[Row]:
    """Best-fit decreasing: each example (longest first) goes into the fullest row it still fits in."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        size = len(examples[index].input_ids)
        if size == 0:
            continue
        fits = [b for b in range(len(bins)) if free[b] >= size]
        if fits:
            best = min(fits, key=lambda b: free[b])
            bins[best].append(index)
            free[best] -= size
        else:
            bins.append([index])
            free.append(max_length - size)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in members:
            example = examples[index]
            ids += example.input_ids
            labels += example.labels
            positions += range(len(example.input_ids))
        rows.append(Row(tuple(ids), tuple(labels), tuple(positions), sum(examples[i].num_targets for i in members)))
    return rows


def collate(rows: Sequence[Row], pad_id: int, packed: bool) -> Batch:
    """Pads ``rows`` to the longest; packed rows get a trailing padding segment instead of an attention mask."""
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention[i, :n] = 1
        positions[i, :n] = torch.tensor(row.position_ids)
        positions[i, n:] = torch.arange(width - n)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=None if packed else attention,
        position_ids=positions if packed else None,
        num_tokens=sum(len(row.input_ids) for row in rows),
        num_targets=sum(row.num_targets for row in rows),
    )
