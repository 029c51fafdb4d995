"""Cases for the Triton LoRA kernels, run in a process of their own under ``TRITON_INTERPRET=1`` on CPU (torch's
inductor imports triton early in the test process, so the interpreter can only be switched on in a fresh one), or
in process on CUDA. Each case returns ``(max |got - want|, max |want|)`` against the float64 reference.

    TRITON_INTERPRET=1 python -m tests.support.triton_cases      # prints {case: [error, scale]} as JSON
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from loraplex.server.lora.ops import lora_add_rows, lora_delta_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _stacks(capacity: int, fan_in: int, rank: int, fan_out: int, seed: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(seed)
    a = (torch.randn(capacity, fan_in, rank, generator=generator) / fan_in**0.5).to(device, dtype)
    b = (torch.randn(capacity, rank, fan_out, generator=generator) / rank**0.5).to(device, dtype)
    return a, b, generator


def _result(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    return (got.double().cpu() - want).abs().max().item(), want.abs().max().item()


def rows_case(row_slots: list[int], rank: int, dtype: str, device: str = "cpu") -> tuple[float, float]:
    """``lora_add_rows``: per-row slots in any order, -1 rows untouched."""
    a, b, generator = _stacks(6, 48, rank, 40, rank + len(row_slots), DTYPES[dtype], device)
    x = torch.randn(len(row_slots), 48, generator=generator).to(device, DTYPES[dtype])
    y = torch.randn(len(row_slots), 40, generator=generator).to(device, DTYPES[dtype])
    want = y.double().cpu().clone()
    rows = [t for t, s in enumerate(row_slots) if s >= 0]
    if rows:
        index, slots = torch.tensor(rows), torch.tensor([row_slots[t] for t in rows])
        want[index] += lora_delta_reference(x.cpu()[index].double(), a.cpu().double(), b.cpu().double(), slots)
    lora_add_rows(y, x, a, b, torch.tensor(row_slots, dtype=torch.int32, device=device))
    return _result(y, want)


def sorted_case(counts: list[int], rank: int, dtype: str, device: str = "cpu") -> tuple[float, float]:
    """``lora_add_sorted`` over a segment sorted by slot (empty slots, slots deeper than one row block)."""
    from loraplex.server.lora.triton_lora import lora_add_sorted

    a, b, generator = _stacks(len(counts), 40, rank, 72, rank + sum(counts), DTYPES[dtype], device)
    slots = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = torch.randn(len(slots), 40, generator=generator).to(device, DTYPES[dtype])
    y = torch.randn(len(slots), 72, generator=generator).to(device, DTYPES[dtype])
    want = y.double().cpu() + lora_delta_reference(x.cpu().double(), a.cpu().double(), b.cpu().double(), slots)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    lora_add_sorted(y, x, a, b, ends, sum(1 for c in counts if c))
    return _result(y, want)


def multi_slice_case(slices: int, dtype: str, device: str = "cpu") -> tuple[float, float]:
    """One multi-slice shrink over ``slices`` stacks (q/k/v or gate/up) against each stack's reference shrink."""
    from loraplex.server.lora.triton_lora import row_order, shrink

    stacks = [_stacks(5, 64, 16, 16, seed, DTYPES[dtype], device)[0] for seed in range(slices)]
    generator = torch.Generator().manual_seed(slices)
    row_slots = torch.tensor([4, -1, 0, 4, 2, 2, -1, 1])
    x = torch.randn(len(row_slots), 64, generator=generator).to(device, DTYPES[dtype])
    order, ends = row_order(row_slots.to(device), 5)
    got = shrink(x, stacks, ends, order)
    rows = (row_slots >= 0).nonzero().squeeze(1)
    eye = torch.eye(16, dtype=torch.float64).expand(5, 16, 16)
    wants = [lora_delta_reference(x.cpu()[rows].double(), s.cpu().double(), eye, row_slots[rows]) for s in stacks]
    return _result(got[:, rows.to(device)], torch.stack(wants))


CASES: dict[str, Callable[..., tuple[float, float]]] = {
    **{
        f"rows-{dtype}-r{rank}-{name}": lambda device="cpu", d=dtype, r=rank, s=slots: rows_case(s, r, d, device)
        for dtype in DTYPES
        for rank in (8, 16, 32)
        for name, slots in (("mixed", [2, -1, 0, 2, 5, -1, 1]), ("none", [-1, -1, -1]), ("one", [3]))
    },
    **{
        f"sorted-{dtype}-{name}": lambda device="cpu", d=dtype, c=counts, r=rank: sorted_case(c, r, d, device)
        for dtype in DTYPES
        for name, counts, rank in (
            ("decode", [1, 1, 0, 1, 1], 16),
            ("deep", [0, 40, 3, 0], 8),
            ("prefill", [130, 2], 64),
        )
    },
    **{
        f"multi-{dtype}-{n}": lambda device="cpu", d=dtype, n=n: multi_slice_case(n, d, device)
        for dtype in DTYPES
        for n in (2, 3)
    },
}


if __name__ == "__main__":
    print(json.dumps({name: case() for name, case in CASES.items()}))
