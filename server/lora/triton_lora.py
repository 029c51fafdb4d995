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
shrinks all of them in one launch (a grid axis per slice); :func:`expand` adds every slice's delta into its own
output in one launch (the slices' fan-outs may differ: q against k/v). A pool whose adapters target only some of
the modules passes only those slices, so a q/k/v projection costs two launches per pool whatever it targets.

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
def _pick(part, first, second, third):
    """The value of slice ``part`` among the three (a selection that also mixes constexpr and runtime ints)."""
    return tl.where(part == 0, first, tl.where(part == 1, second, third))


@triton.jit
def _expand_kernel(
    s_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    y0_ptr,
    y1_ptr,
    y2_ptr,
    order_ptr,
    ends_ptr,
    rank,
    most_out,
    out0,
    out1,
    out2,
    stride_ss,
    stride_sm,
    stride_sk,
    stride_bc0,
    stride_bc1,
    stride_bc2,
    stride_bk0,
    stride_bk1,
    stride_bk2,
    stride_ym0,
    stride_ym1,
    stride_ym2,
    has_order: tl.constexpr,
    f32_dot: tl.constexpr,
    block_m: tl.constexpr,
    block_n: tl.constexpr,
    block_k: tl.constexpr,
):
    """``y_slice[t] += shrunk[slice, t] @ b_slice[slot]`` for the rows of one slot, one row block, one output block
    of one slice (one rounding); the slices' fan-outs may differ (q and k/v), the grid spans the widest."""
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    part = tl.program_id(2)
    out_blocks = tl.cdiv(most_out, block_n)
    pid_m = pid // out_blocks
    pid_n = pid % out_blocks
    fan_out = _pick(part, out0, out1, out2)
    end = tl.load(ends_ptr + slot)
    start = tl.where(slot > 0, tl.load(ends_ptr + tl.maximum(slot - 1, 0)), 0)
    first = start + pid_m * block_m
    if first >= end or pid_n * block_n >= fan_out:
        return
    b_ptr = b0_ptr
    y_ptr = y0_ptr
    if part == 1:
        b_ptr = b1_ptr
        y_ptr = y1_ptr
    if part == 2:
        b_ptr = b2_ptr
        y_ptr = y2_ptr
    stride_bc = _pick(part, stride_bc0, stride_bc1, stride_bc2)
    stride_bk = _pick(part, stride_bk0, stride_bk1, stride_bk2)
    stride_ym = _pick(part, stride_ym0, stride_ym1, stride_ym2)
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
            s_ptr + part * stride_ss + rows[:, None].to(tl.int64) * stride_sm + offs_k[None, :] * stride_sk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            b_ptr + slot.to(tl.int64) * stride_bc + offs_k[:, None] * stride_bk + offs_n[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if f32_dot:
            acc += tl.dot(s.to(w.dtype).to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(s.to(w.dtype), w)
    y_tile = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
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


def _check_expand(ys: Sequence[torch.Tensor], shrunk: torch.Tensor, stacks: Sequence[torch.Tensor]) -> None:
    if not 1 <= len(stacks) <= MAX_SLICES or len(ys) != len(stacks) or shrunk.shape[0] < len(stacks):
        raise ValueError(f"expand takes 1 to {MAX_SLICES} outputs, stacks and shrunk slices, got {len(stacks)}")
    rank = stacks[0].shape[1]
    for y, b in zip(ys, stacks, strict=True):
        if b.dtype != stacks[0].dtype or y.dtype != ys[0].dtype or b.shape[1] != rank or y.shape[1] != b.shape[2]:
            raise ValueError(f"y {tuple(y.shape)} and b {tuple(b.shape)} disagree with the first slice or each other")
        if y.shape[0] != shrunk.shape[1] or y.stride(1) != 1 or b.stride(2) != 1:
            raise ValueError("expand wants rows of shrunk's length, unit column strides in y and b")
    if shrunk.shape[2] != rank:
        raise ValueError(f"shrunk {tuple(shrunk.shape)} has not the stacks' rank {rank}")


def expand(
    ys: Sequence[torch.Tensor],
    shrunk: torch.Tensor,
    stacks: Sequence[torch.Tensor],
    ends: torch.Tensor,
    order: torch.Tensor | None = None,
    block_rows: int = _MIN_DOT,
) -> None:
    """In place, in one launch for all ``S`` slices: ``ys[i][t] += shrunk[i, t] @ stacks[i][slot]`` (``shrunk [S',
    T, R]`` float32 with ``S' >= S``, ``stacks[i] [C, R, out_i]``, ``ys[i] [T, out_i]``: the fan-outs may differ)
    for the rows of every slot; ``ends`` and ``order`` as for :func:`shrink`."""
    _launchable(shrunk.device)
    _check_expand(ys, shrunk, stacks)
    capacity = stacks[0].shape[0]
    if ends.shape[0] != capacity:
        raise ValueError(f"ends {tuple(ends.shape)} and stacks of {capacity} slots disagree")
    if shrunk.shape[1] == 0 or capacity == 0:
        return
    fan_outs = [b.shape[2] for b in stacks]
    most_out = max(fan_outs)
    block_n, block_k = _block(most_out, 128), _block(stacks[0].shape[1], 64)
    grid = (triton.cdiv(shrunk.shape[1], block_rows) * triton.cdiv(most_out, block_n), capacity, len(stacks))

    def padded(values: list[object]) -> list[object]:
        return [*values, *[values[0]] * (MAX_SLICES - len(values))]

    _expand_kernel[grid](
        shrunk,
        *padded(list(stacks)),
        *padded(list(ys)),
        ends if order is None else order,
        ends,
        stacks[0].shape[1],
        most_out,
        *padded(list(fan_outs)),
        *shrunk.stride(),
        *padded([b.stride(0) for b in stacks]),
        *padded([b.stride(1) for b in stacks]),
        *padded([y.stride(0) for y in ys]),
        has_order=order is not None,
        f32_dot=_f32_dot(stacks[0].dtype),
        block_m=block_rows,
        block_n=block_n,
        block_k=block_k,
    )


def lora_add_sorted(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    group_ends: torch.Tensor,
    groups: int,
) -> None:
    """In place ``ys[i] += delta_i`` for a pool segment whose rows are sorted by slot (``group_ends [C]`` int32, as
    :class:`~loraplex.server.lora.mapping.LoraSegment` holds them; ``groups``: its distinct slots), for up to three
    modules of the pool that share the input ``x`` (q/k/v, gate/up): one shrink and one expand launch for all."""
    rows = rows_per_program(x.shape[0], groups)
    expand(ys, shrink(x, a, group_ends, block_rows=rows), b, group_ends, block_rows=rows)


def row_order(row_slots: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [T], ends [C])`` of per-row slots, on the device without a host synchronisation: the rows sorted by
    slot with the rows of slot ``-1`` last (outside every slot's range), and one past each slot's last sorted row."""
    keys = torch.where(row_slots < 0, capacity, row_slots).long()
    order = torch.argsort(keys, stable=True).to(torch.int32)
    counts = torch.zeros(capacity + 1, dtype=torch.int32, device=row_slots.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    return order, counts.cumsum(0, dtype=torch.int32)[:capacity]


def lora_add_rows(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    row_slots: torch.Tensor,
) -> None:
    """In place ``ys[i][t] += (x[t] @ a[i][row_slots[t]]) @ b[i][row_slots[t]]`` for the rows with ``row_slots[t] >=
    0``, for up to three modules sharing ``x``: one device sort of the rows, then one shrink and one expand launch
    for all (BGMV-style; graph-capturable: see the module docstring)."""
    order, ends = row_order(row_slots, a[0].shape[0])
    expand(ys, shrink(x, a, ends, order), b, ends, order)
