"""The graph-safe row-slot LoRA entry point (``lora_add_rows``) against the float64 per-token reference."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.lora.ops import lora_add_rows, lora_delta_reference


def _stacks(slots: int, fan_in: int, rank: int, fan_out: int, seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    a = (torch.randn(slots, fan_in, rank, generator=generator) / fan_in**0.5).to(dtype)
    b = (torch.randn(slots, rank, fan_out, generator=generator) / rank**0.5).to(dtype)
    return a, b, generator


def _want(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """``y + delta`` in float64, rows of slot -1 unchanged."""
    want = y.double().clone()
    rows = [t for t, s in enumerate(row_slots) if s >= 0]
    if rows:
        index = torch.tensor(rows)
        slots = torch.tensor([row_slots[t] for t in rows])
        want[index] += lora_delta_reference(x[index].double(), a.double(), b.double(), slots)
    return want


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    ("row_slots", "rank"),
    [
        ([2, -1, 0, 2, 5, -1, 1], 8),  # mixed slots, unsorted, base rows between
        ([-1, -1, -1], 16),  # no row of this pool: y unchanged
        ([3], 32),
    ],
)
def test_lora_add_rows_torch_matches_reference(row_slots: list[int], rank: int, slot_dtype: torch.dtype) -> None:
    a, b, generator = _stacks(6, 48, rank, 40, seed=rank, dtype=torch.float32)
    x = torch.randn(len(row_slots), 48, generator=generator)
    y = torch.randn(len(row_slots), 40, generator=generator)
    want = _want(y, x, a, b, row_slots)
    lora_add_rows(y, x, a, b, torch.tensor(row_slots, dtype=slot_dtype))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
