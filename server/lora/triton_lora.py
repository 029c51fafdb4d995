# mypy: disable-error-code="import-untyped,untyped-decorator,no-untyped-def"
# (triton ships no type information, and a kernel's parameter annotations are triton's own: tl.constexpr)
"""Triton kernels for the batched LoRA delta of a step: one shrink and one expand launch for all adapters of a pool.

Semantics (what every entry point here computes)::

    for every row t with a slot s (rows sorted by slot, or listed in slot order by ``order``):
        shrunk[t] = x[t] @ a[s]                  # shrink: a [C, in, R] → shrunk [T, R], float32 accumulation
        y[t]     += shrunk[t] @ b[s]             # expand: b [C, R, out], scaling folded into b, added in place

Design (the SGMV layout of Punica / S-LoRA, and vLLM's one-launch-for-all-LoRAs grid): rows are grouped by slot
(``ends [C]``: one past the last sorted row of each slot), the grid is ``(row blocks x column blocks, C, slices)``
and each program multiplies up to ``block_m`` rows of one slot against a tile of that slot's weights with
``tl.dot``, so a slot's weights are read once per row block whatever the number of adapters in the step. Programs
of slots without rows (or row blocks past a slot's rows) exit at once. The grid depends only on the row count and
the pool capacity, never on the data, so :func:`lora_add_rows` (per-row slots, ``-1`` for rows of no adapter of
this pool: sorted on the device, no host synchronisation) can be captured in a CUDA graph.

Stacks are per pool and a pool has one rank (its rank bucket): a launch never pads an adapter to the largest rank
of the step, and mixed ranks cost one launch per pool. The stacks may be float32, bfloat16 or float16; rows and
outputs may have another dtype (cast in the kernel): products accumulate in float32 (float32 stacks use IEEE
``dot``, not TF32: :func:`_f32_dot`), the shrunk rows are kept in float32 and rounded to the stacks' dtype for the
expand's ``dot``, and the output is rounded once, after the add.

Multi-slice: :func:`shrink` takes up to three stacks of one pool that share their input (q/k/v, gate/up) and
shrinks all of them in one launch (a grid axis per slice).

The kernels launch on CUDA tensors, and on CPU tensors in a process that runs Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is first imported; torch's inductor imports it early, so the tests run the
interpreted cases in a subprocess: ``tests/support/triton_cases.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_SLICES = 3
_MIN_DOT = 16  # tl.dot wants every block dimension to be at least 16


@triton.jit
def _shrink_kernel(
    x_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    out_ptr,
    order_ptr,
    ends_ptr,
    fan_in,
    rank,
    stride_xm,
    stride_xk,
    stride_ac,
    stride_ak,
    stride_an,
    stride_os,
    stride_om,
    stride_on,
    has_order: tl.constexpr,
    f32_dot: tl.constexpr,
    block_m: tl.constexpr,
    block_n: tl.constexpr,
    block_k: tl.constexpr,
):
    """``out[slice, t, :] = x[t] @ a_slice[slot]`` for the rows of one slot, one row block, one rank block."""
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    part = tl.program_id(2)
    rank_blocks = tl.cdiv(rank, block_n)
    pid_m = pid // rank_blocks
    pid_n = pid % rank_blocks
    end = tl.load(ends_ptr + slot)
    start = tl.where(slot > 0, tl.load(ends_ptr + tl.maximum(slot - 1, 0)), 0)
    first = start + pid_m * block_m
    if first >= end:
        return
    offs_m = first + tl.arange(0, block_m)
    row_mask = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=row_mask, other=0) if has_order else offs_m
    a_ptr = a0_ptr
    if part == 1:
        a_ptr = a1_ptr
    if part == 2:
        a_ptr = a2_ptr
    offs_n = pid_n * block_n + tl.arange(0, block_n)
    col_mask = offs_n < rank
    acc = tl.zeros((block_m, block_n), dtype=tl.float32)
    for k in range(0, tl.cdiv(fan_in, block_k)):
        offs_k = k * block_k + tl.arange(0, block_k)
        k_mask = offs_k < fan_in
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            a_ptr + slot.to(tl.int64) * stride_ac + offs_k[:, None] * stride_ak + offs_n[None, :] * stride_an,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if f32_dot:
            acc += tl.dot(x.to(w.dtype).to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), w)
    tl.store(
        out_ptr + part * stride_os + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
        acc,
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _expand_kernel(
    s_ptr,
    b_ptr,
    y_ptr,
    order_ptr,
    ends_ptr,
    rank,
    fan_out,
    stride_sm,
    stride_sk,
    stride_bc,
    stride_bk,
    stride_bn,
    stride_ym,
    stride_yn,
    has_order: tl.constexpr,
    f32_dot: tl.constexpr,
    block_m: tl.constexpr,
    block_n: tl.constexpr,
    block_k: tl.constexpr,
):
    """``y[t] += shrunk[t] @ b[slot]`` for the rows of one slot, one row block, one output block (one rounding)."""
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    out_blocks = tl.cdiv(fan_out, block_n)
    pid_m = pid // out_blocks
    pid_n = pid % out_blocks
    end = tl.load(ends_ptr + slot)
    start = tl.where(slot > 0, tl.load(ends_ptr + tl.maximum(slot - 1, 0)), 0)
    first = start + pid_m * block_m
    if first >= end:
        return
    offs_m = first + tl.arange(0, block_m)
    row_mask = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=row_mask, other=0) if has_order else offs_m
    offs_n = pid_n * block_n + tl.arange(0, block_n)
    col_mask = offs_n < fan_out
    acc = tl.zeros((block_m, block_n), dtype=tl.float32)
    for k in range(0, tl.cdiv(rank, block_k)):
        offs_k = k * block_k + tl.arange(0, block_k)
        k_mask = offs_k < rank
        s = tl.load(
            s_ptr + rows[:, None].to(tl.int64) * stride_sm + offs_k[None, :] * stride_sk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            b_ptr + slot.to(tl.int64) * stride_bc + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if f32_dot:
            acc += tl.dot(s.to(w.dtype).to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(s.to(w.dtype), w)
    y_tile = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tile_mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_tile, mask=tile_mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=tile_mask)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels launch on ``device``: compiled on CUDA, or on CPU tensors when this process runs Triton's
    interpreter (``TRITON_INTERPRET=1`` set before triton was first imported: the tests' subprocess)."""
    return device.type == "cuda" or (device.type == "cpu" and bool(triton.knobs.runtime.interpret))


def _launchable(device: torch.device) -> None:
    if not runs_on(device):
        raise ValueError(
            f"the Triton LoRA kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device}"
        )


def _f32_dot(dtype: torch.dtype) -> bool:
    """IEEE float32 ``dot`` for float32 stacks (no TF32), and under the interpreter for every dtype (its ``dot`` of
    bfloat16 tiles is wrong: numpy has no bfloat16); the tiles are rounded to the stacks' dtype first, so the products
    are the ones a reduced-precision ``dot`` accumulates in float32."""
    return dtype == torch.float32 or bool(triton.knobs.runtime.interpret)


def _block(size: int, cap: int) -> int:
    return max(_MIN_DOT, min(cap, int(triton.next_power_of_2(size))))


def rows_per_program(rows: int, groups: int) -> int:
    """Rows per program: 16 when slots hold few rows each (decode), 64 when they hold many (prefill)."""
    return 64 if rows >= 64 * max(groups, 1) else _MIN_DOT


def _check(x: torch.Tensor, stacks: Sequence[torch.Tensor], ends: torch.Tensor) -> None:
    if not 1 <= len(stacks) <= MAX_SLICES:
        raise ValueError(f"shrink takes 1 to {MAX_SLICES} stacks, got {len(stacks)}")
    first = stacks[0]
    for stack in stacks[1:]:
        if stack.shape != first.shape or stack.stride() != first.stride() or stack.dtype != first.dtype:
            raise ValueError("the stacks of one multi-slice shrink must share shape, layout and dtype")
    if x.shape[1] != first.shape[1] or ends.shape[0] != first.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, stacks {tuple(first.shape)} and ends {tuple(ends.shape)} disagree")


def shrink(
    x: torch.Tensor,
    stacks: Sequence[torch.Tensor],
    ends: torch.Tensor,
    order: torch.Tensor | None = None,
    block_rows: int = _MIN_DOT,
) -> torch.Tensor:
    """``[S, T, R]`` float32: ``x [T, in] @ stacks[i][slot]`` (``[C, in, R]`` each) for the rows of every slot, in one
    launch for all ``S`` slices; ``ends [C]``: one past the last sorted row of each slot; ``order [T]``: the rows in
    slot order (None: the rows are sorted already). Rows outside every slot are left undefined."""
    _launchable(x.device)
    _check(x, stacks, ends)
    capacity, fan_in, rank = stacks[0].shape
    out = torch.empty((len(stacks), x.shape[0], rank), dtype=torch.float32, device=x.device)
    if x.shape[0] == 0 or capacity == 0:
        return out
    padded = [*stacks, *[stacks[0]] * (MAX_SLICES - len(stacks))]
    block_n, block_k = _block(rank, 64), _block(fan_in, 128)
    grid = (triton.cdiv(x.shape[0], block_rows) * triton.cdiv(rank, block_n), capacity, len(stacks))
    _shrink_kernel[grid](
        x,
        *padded,
        out,
        ends if order is None else order,
        ends,
        fan_in,
        rank,
        *x.stride(),
        *stacks[0].stride(),
        *out.stride(),
        has_order=order is not None,
        f32_dot=_f32_dot(stacks[0].dtype),
        block_m=block_rows,
        block_n=block_n,
        block_k=block_k,
    )
    return out


def expand(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    b: torch.Tensor,
    ends: torch.Tensor,
    order: torch.Tensor | None = None,
    block_rows: int = _MIN_DOT,
) -> None:
    """In place: ``y[t] += shrunk[t] @ b[slot]`` (``shrunk [T, R]`` float32, ``b [C, R, out]``) for the rows of every
    slot, in one launch; ``ends`` and ``order`` as for :func:`shrink`."""
    _launchable(y.device)
    capacity, rank, fan_out = b.shape
    if shrunk.shape != (y.shape[0], rank) or y.shape[1] != fan_out or ends.shape[0] != capacity:
        raise ValueError(f"y {tuple(y.shape)}, shrunk {tuple(shrunk.shape)} and b {tuple(b.shape)} disagree")
    if y.shape[0] == 0 or capacity == 0:
        return
    block_n, block_k = _block(fan_out, 128), _block(rank, 64)
    grid = (triton.cdiv(y.shape[0], block_rows) * triton.cdiv(fan_out, block_n), capacity)
    _expand_kernel[grid](
        shrunk,
        b,
        y,
        ends if order is None else order,
        ends,
        rank,
        fan_out,
        *shrunk.stride(),
        *b.stride(),
        *y.stride(),
        has_order=order is not None,
        f32_dot=_f32_dot(b.dtype),
        block_m=block_rows,
        block_n=block_n,
        block_k=block_k,
    )


def lora_add_sorted(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, group_ends: torch.Tensor, groups: int
) -> None:
    """In place ``y += delta`` for a pool segment whose rows are sorted by slot (``group_ends [C]`` int32, as
    :class:`~loraplex.server.lora.mapping.LoraSegment` holds them; ``groups``: its distinct slots)."""
    rows = rows_per_program(x.shape[0], groups)
    expand(y, shrink(x, (a,), group_ends, block_rows=rows)[0], b, group_ends, block_rows=rows)


def row_order(row_slots: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [T], ends [C])`` of per-row slots, on the device without a host synchronisation: the rows sorted by
    slot with the rows of slot ``-1`` last (outside every slot's range), and one past each slot's last sorted row."""
    keys = torch.where(row_slots < 0, capacity, row_slots).long()
    order = torch.argsort(keys, stable=True).to(torch.int32)
    counts = torch.zeros(capacity + 1, dtype=torch.int32, device=row_slots.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    return order, counts.cumsum(0, dtype=torch.int32)[:capacity]


def lora_add_rows(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slots: torch.Tensor) -> None:
    """In place ``y[t] += (x[t] @ a[row_slots[t]]) @ b[row_slots[t]]`` for the rows with ``row_slots[t] >= 0``, by
    the BGMV-style launches over the device-sorted rows (graph-capturable: see the module docstring)."""
    order, ends = row_order(row_slots, a.shape[0])
    expand(y, shrink(x, (a,), ends, order)[0], b, ends, order)
