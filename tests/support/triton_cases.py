"""Cases for the Triton LoRA kernels, run in a process of their own under ``TRITON_INTERPRET=1`` on CPU (torch's
inductor imports triton early in the test process, so the interpreter can only be switched on in a fresh one), or
in process on CUDA. Each case returns ``(max |got - want|, max |want|)`` against the float64 reference (the
``permodule`` cases: the merged projection against the same linears run one by one).

    TRITON_INTERPRET=1 python -m tests.support.triton_cases      # prints {case: [error, scale]} as JSON
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from loraplex.server.core.shape import TARGET_MODULES
from loraplex.server.lora.layers import PROJECTIONS, LoraLinear, LoraProjection
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import LoraBackend, LoraKernels, lora_add_rows, lora_delta_reference
from loraplex.server.lora.pool import PoolKey, SlotPool
from tests.support.shapes import TINY_SHAPE

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
    lora_add_sorted([y], x, [a], [b], ends, sum(1 for c in counts if c))
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


LAYER = 1  # a layer past the first, as the pools hold its stacks
TRITON = LoraKernels(grouped_works=False, by_shape=False, forced=LoraBackend.TRITON)
# pools of three ranks (never padded to one another), targeting q/k/v and gate/up partly or fully: rank 8 q,v (k gets
# nothing from it), rank 16 every module, rank 32 up and down (gate gets nothing from it); then base rows
POOL_KEYS = (
    PoolKey(8, ("q_proj", "v_proj"), False),
    PoolKey(16, TARGET_MODULES, False),
    PoolKey(32, ("up_proj", "down_proj"), False),
)
SEGMENTS = ((0, [0, 0, 2]), (1, [1, 2]), (2, [0, 1, 1]))  # (pool, its rows' slots, sorted), in batch order
BASE_ROWS = 2


def _pool(key: PoolKey, seed: int, dtype: torch.dtype, device: str) -> SlotPool:
    pool = SlotPool(key, TINY_SHAPE, 3, dtype, torch.device(device))
    generator = torch.Generator().manual_seed(seed)
    for module in key.modules:
        a, b = pool.a[module][LAYER], pool.b[module][LAYER]
        a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
        b.copy_(torch.randn(b.shape, generator=generator) / b.shape[1] ** 0.5)
        if key.dora:
            pool.dora[module][LAYER].copy_(torch.rand(pool.dora[module][LAYER].shape, generator=generator) + 0.5)
    return pool


def _projection(
    group: str, dtype: torch.dtype, device: str, kernels: LoraKernels
) -> tuple[LoraProjection, torch.Tensor]:
    """The q/k/v (or gate/up) projection of layer 1 of the tiny shape over random base linears, and its input."""
    modules = next(g for g in PROJECTIONS if g[0] == group)
    generator = torch.Generator().manual_seed(len(modules))
    fan_in = TINY_SHAPE.module_dims(modules[0])[0]
    linears = []
    for module in modules:
        base = torch.nn.Linear(fan_in, TINY_SHAPE.module_dims(module)[1])
        torch.nn.init.normal_(base.weight, std=fan_in**-0.5, generator=generator)
        torch.nn.init.normal_(base.bias, generator=generator)
        linears.append(LoraLinear(base.to(device, dtype), LAYER, module))
    rows = sum(len(slots) for _, slots in SEGMENTS) + BASE_ROWS
    return LoraProjection(linears, kernels), torch.randn(rows, fan_in, generator=generator).to(device, dtype)


def _projection_want(
    projection: LoraProjection, x: torch.Tensor, pools: list[tuple[SlotPool, list[int]]]
) -> list[torch.Tensor]:
    """float64 ``base(x)`` (the linears' own output, rounded as theirs) plus every pool's per-row delta (``-1``
    rows: none), through the DoRA scale for DoRA pools."""
    with torch.no_grad():
        wants = [linear.base(x).double().cpu() for linear in projection.linears]
    x64 = x.double().cpu()
    for pool, row_slots in pools:
        rows = torch.tensor([t for t, s in enumerate(row_slots) if s >= 0], dtype=torch.long)
        slots = torch.tensor([s for s in row_slots if s >= 0], dtype=torch.long)
        for want, linear in zip(wants, projection.linears, strict=True):
            if linear.module not in pool.a or not len(rows):
                continue
            a, b = pool.a[linear.module][LAYER].double().cpu(), pool.b[linear.module][LAYER].double().cpu()
            delta = lora_delta_reference(x64[rows], a, b, slots)
            if pool.key.dora:
                assert linear.bias is not None
                bias, scale = linear.bias.double().cpu(), pool.dora[linear.module][LAYER].double().cpu()[slots]
                want[rows] = bias + scale * (want[rows] - bias + delta)
            else:
                want[rows] += delta
    return wants


def _results(gots: list[torch.Tensor], wants: list[torch.Tensor]) -> tuple[float, float]:
    errors = [_result(got, want) for got, want in zip(gots, wants, strict=True)]
    return max(error for error, _ in errors), max(scale for _, scale in errors)


def _sorted_rows(pools: list[SlotPool]) -> list[tuple[SlotPool, list[int]]]:
    """Per pool, the row slots of :data:`SEGMENTS` over the whole batch (``-1`` outside the pool's segment)."""
    rows = sum(len(slots) for _, slots in SEGMENTS) + BASE_ROWS
    per_pool, start = [], 0
    for index, slots in SEGMENTS:
        per_pool.append((pools[index], [-1] * start + slots + [-1] * (rows - start - len(slots))))
        start += len(slots)
    return per_pool


def projection_case(
    group: str, dtype: str, form: str, device: str = "cpu", kernels: LoraKernels = TRITON
) -> tuple[float, float]:
    """A merged projection (``group``: q_proj = q/k/v, gate_proj = gate/up) over three pools of mixed ranks and
    targets and base rows. ``form``: ``eager`` (the forward pass: segments of a :class:`LoraMapping`), ``rows``
    (the static decode form: per-pool row slots in shuffled order), ``permodule`` (eager, against each linear run
    alone), ``dora`` (eager, the rank-8 pool as DoRA). ``kernels``: the Triton ones unless told (the CPU torch
    test passes the others; the ``rows`` form runs Triton wherever it launches, the torch form elsewhere)."""
    keys = [PoolKey(k.rank, k.modules, form == "dora" and i == 0) for i, k in enumerate(POOL_KEYS)]
    pools = [_pool(key, seed, DTYPES[dtype], device) for seed, key in enumerate(keys)]
    projection, x = _projection(group, DTYPES[dtype], device, kernels)
    per_pool = _sorted_rows(pools)
    with torch.inference_mode():
        if form == "rows":
            shuffle = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(7))
            per_pool = [(pool, [row_slots[t] for t in shuffle.tolist()]) for pool, row_slots in per_pool]
            x = x[shuffle.to(device)]
            lora = [(pool, torch.tensor(row_slots, dtype=torch.int32, device=device)) for pool, row_slots in per_pool]
            return _results(projection.rows(x, lora), _projection_want(projection, x, per_pool))
        mapping = LoraMapping.build(
            [(pools[index], slot, 1) for index, slots in SEGMENTS for slot in slots], torch.device(device)
        )
        got = projection(x, mapping)
        if form == "permodule":
            alone = [LoraProjection([linear], kernels)(x, mapping)[0] for linear in projection.linears]
            return _results(got, [y.double().cpu() for y in alone])
    return _results(got, _projection_want(projection, x, per_pool))


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
    **{
        f"proj-{dtype}-{group}-{form}": lambda device="cpu", g=group, d=dtype, f=form: projection_case(g, d, f, device)
        for dtype in ("float32", "bfloat16")  # the serving dtypes (float16 stacks: the cases above)
        for group in ("q_proj", "gate_proj")
        for form in ("eager", "rows", "permodule", *(("dora",) if (dtype, group) == ("float32", "q_proj") else ()))
    },
}


if __name__ == "__main__":
    print(json.dumps({name: case() for name, case in CASES.items()}))
