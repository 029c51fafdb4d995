"""The batched LoRA math: the one module that computes LoRA deltas for a batch of tokens of mixed adapters.

Semantics (what every implementation here computes)::

    for every token t of a pool segment, with slot s = slots[t]:
        delta[t] = (x[t] @ a[s]) @ b[s]          # a: [C, in, R], b: [C, R, out]; scaling folded into b
    tokens are sorted by slot, so slot s owns rows group_ends[s-1] .. group_ends[s]-1 (group_ends: [C], int32)

Implementations (kernels), chosen per pool segment of every step by :class:`LoraKernels` from the segment's shape:

- ``grouped``: two ``torch._grouped_mm`` calls (shrink ``x @ a``, expand ``@ b``) over the slot groups. It reads
  each adapter's weights once and copies nothing, but on CPU it pays per group: it wins when groups hold many rows
  (prefill, or few adapters) and loses at decode with one row per adapter.
- ``gather``: gathers each row's ``a``/``b`` and uses ``bmm``; it pays per row (a copy of the weights per row), so it
  wins when rows and groups are few and about equal (decode over distinct adapters), and is the only kernel where
  grouped_mm is unavailable (for example float32 on CUDA).
- ``window``: when every row has its own slot (decode over distinct adapters) and those slots lie in a window at
  most :data:`WINDOW_MAX_WIDTH_PER_ROW` times the rows wide, ``bmm`` over *views* of the stacks for that window
  (rows of empty slots in it are zeros). No weight is copied: on CPU at 32 decode rows of 32 adapters (rank 16)
  it takes 0.07-0.27 ms where gather takes 0.23-0.58 ms and grouped 0.56-0.72 ms.
- ``padded`` (CPU): the window idea for groups of several rows per slot (prefill chunks of many adapters): each
  slot's rows padded to the deepest group, ``[width, depth]``, and two ``bmm`` over views of the stacks for the
  slots' window, when that layout holds at most :data:`PADDED_MAX_ROWS_PER_ROW` times the rows. At 32 groups of 25
  rows (576 -> 576, rank 16) it takes 0.12 ms in bfloat16 where grouped takes 0.96 (0.27 / 0.46 in float32).
- ``fused`` (CPU, bfloat16/float16 stacks): the window case as one kernel compiled by TorchInductor that reads the
  stacks' window once in their own dtype, accumulates in float32 and adds the delta into the base output (one
  rounding). Eager ``bmm`` over reduced-precision stacks at one row per adapter runs at about half its float32
  speed on CPU, which is why the stacks used to stay float32 under a bf16 base; this kernel reads half the bytes of
  float32 stacks instead. Built ahead of time by AOTInductor (``compiled.py``: once per machine and torch version,
  then loaded from disk in milliseconds; a call costs about 40 µs where ``torch.compile``'s call path alone took
  50-60), probed against the reference at start-up (:func:`fused_kernel_works`); where it does not build (no C++
  compiler), the stacks stay float32 and the other kernels run.
- :func:`lora_delta_reference` is the plain per-token definition above, for tests.

The CPU rule, measured by ``loadtests/bench_lora_ops.py`` (see loadtests/BENCHMARKS.md): fused where the segment
has a window of at least two rows and the stacks are bfloat16/float16 (not DoRA); window where it has one; padded
where the mapping found a padded layout; else gather when it has at most :data:`GATHER_MAX_ROWS` rows and at
most :data:`GATHER_MAX_ROWS_PER_GROUP` rows per distinct adapter on average; grouped otherwise. On CUDA grouped is used
wherever it works (window where it does not).

DoRA (per slot a magnitude scale ``g = m / ||W + s·B·A||`` over output rows, precomputed at load) turns the layer
output ``y = Wx + bias`` into ``bias + g ⊙ (Wx + delta)``: :func:`apply_dora`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from types import ModuleType

import torch

from loraplex.server.lora import compiled
from loraplex.server.lora.calibration import BUCKETS, DEFAULT_LAYER, Calibration, Candidate, LayerShape, measure

log = logging.getLogger(__name__)

LoraDelta = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Tensors = list[torch.Tensor]
# one projection's ``ys[i] += delta_i`` in a calibration: (outputs, x, a stacks, b stacks, slots, ends, adapters)
AddProjection = Callable[[Tensors, torch.Tensor, Tensors, Tensors, torch.Tensor, torch.Tensor, int], object]


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Per-token definition: ``x [T, in]``, ``a [C, in, R]``, ``b [C, R, out]``, ``slots [T]`` → ``[T, out]``."""
    rows = [(x[t : t + 1] @ a[int(s)]) @ b[int(s)] for t, s in enumerate(slots.tolist())]
    return torch.cat(rows) if rows else x.new_zeros((0, b.shape[-1]))


def lora_delta_grouped(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    """Sorted tokens, two grouped matmuls; ``slots`` unused (the groups carry it)."""
    del slots
    shrunk = torch._grouped_mm(x, a, offs=group_ends)
    return torch._grouped_mm(shrunk, b, offs=group_ends)


def lora_delta_gather(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    """Gathers each token's weights and runs two batched matmuls; ``group_ends`` unused."""
    del group_ends
    shrunk = torch.bmm(x.unsqueeze(1), a.index_select(0, slots))
    return torch.bmm(shrunk, b.index_select(0, slots)).squeeze(1)


def lora_add_rows(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slots: torch.Tensor) -> None:
    """In place: ``y[t] += (x[t] @ a[row_slots[t]]) @ b[row_slots[t]]`` for every row ``t`` with
    ``row_slots[t] >= 0``; ``row_slots`` int32/int64 ``[T]``, ``-1`` for a row without this pool's adapter. No host
    synchronisation and no data-dependent shapes, so it can be captured in a CUDA graph (a static-shape decode
    step). One module of :func:`lora_add_rows_slices`."""
    lora_add_rows_slices((y,), x, (a,), (b,), row_slots)


def lora_add_rows_slices(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    row_slots: torch.Tensor,
) -> None:
    """:func:`lora_add_rows` for up to three modules of one pool that share the input ``x`` (q/k/v, gate/up):
    ``ys[i] += delta(x, a[i], b[i])``. Where the Triton kernels run (CUDA; CPU under the interpreter) by one device
    sort of the rows and one multi-slice shrink and expand launch for all modules
    (:func:`loraplex.server.lora.triton_lora.lora_add_rows`); elsewhere the torch form, per module: slots clamped
    to 0, each row's weights gathered, two ``bmm``, the delta multiplied by the row mask (rows of ``-1`` add zeros),
    computed in the stacks' dtype and added into ``ys[i]``."""
    kernels = _triton_lora()
    if kernels is not None and kernels.runs_on(x.device):
        kernels.lora_add_rows(ys, x, a, b, row_slots)
        return
    slots = row_slots.clamp(min=0).long()
    valid = (row_slots >= 0).unsqueeze(1)
    for y, a_stack, b_stack in zip(ys, a, b, strict=True):
        shrunk = torch.bmm(x.to(a_stack.dtype).unsqueeze(1), a_stack.index_select(0, slots))
        delta = torch.bmm(shrunk, b_stack.index_select(0, slots)).squeeze(1)
        y.add_((delta * valid.to(delta.dtype)).to(y.dtype))


@dataclasses.dataclass(frozen=True)
class SlotWindow:
    """A segment whose rows each have their own slot, all within ``first .. first + width - 1``: the window
    kernel reads the weight stacks there as a view (no per-row copy of the weights)."""

    first: int
    width: int
    local: torch.Tensor | None  # [rows] long: each row's slot - first; None when the rows fill the window in order


def lora_delta_window(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, window: SlotWindow) -> torch.Tensor:
    """Two batched matmuls over the slot window's views of ``a``/``b``; rows of empty slots are zeros, dropped."""
    a_view = a.narrow(0, window.first, window.width)
    b_view = b.narrow(0, window.first, window.width)
    if window.local is None:
        return torch.bmm(torch.bmm(x.unsqueeze(1), a_view), b_view).squeeze(1)
    spread = x.new_zeros((window.width, x.shape[1])).index_copy_(0, window.local, x)
    delta = torch.bmm(torch.bmm(spread.unsqueeze(1), a_view), b_view).squeeze(1)
    return delta.index_select(0, window.local)


@dataclasses.dataclass(frozen=True)
class PaddedGroups:
    """A segment whose rows come in groups of several per slot (prefill chunks), all within a narrow slot window:
    the padded kernel lays its rows out as ``[width, depth]`` (each slot's rows padded to the deepest group; empty
    slots and padding are zero rows) and computes every group with two ``bmm`` over *views* of the stacks."""

    first: int
    width: int
    depth: int
    index: torch.Tensor  # [rows] long: each row's place in the flattened [width * depth] layout


def lora_delta_padded(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: PaddedGroups) -> torch.Tensor:
    """Two batched matmuls over the padded layout: each adapter's weights read once, none copied."""
    padded = x.new_zeros((groups.width * groups.depth, x.shape[1])).index_copy_(0, groups.index, x)
    shrunk = torch.bmm(padded.view(groups.width, groups.depth, -1), a.narrow(0, groups.first, groups.width))
    delta = torch.bmm(shrunk, b.narrow(0, groups.first, groups.width))
    return delta.view(groups.width * groups.depth, -1).index_select(0, groups.index)


def _fused_window_add(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``y + delta`` over a slot window's views ``a [W, in, R]``, ``b [W, R, out]``; row ``t`` uses window slot
    ``offsets[t]``. Written as reductions (not ``bmm``) so TorchInductor fuses the casts, both contractions and the
    add into one pass over the weights; empty window slots see zero rows."""
    spread = x.new_zeros((a.shape[0], x.shape[1])).index_copy(0, offsets, x).float()
    shrunk = (spread.unsqueeze(-1) * a.float()).sum(1)  # [W, R]
    delta = (shrunk.unsqueeze(-1) * b.float()).sum(1)  # [W, out]
    return (y.float() + delta.index_select(0, offsets)).to(y.dtype)


# The fused kernel's argument sizes (see :func:`compiled.load_or_build`): rows T, fan-in I, fan-out O, window W,
# rank R.
_FUSED_SIZES = {"y": ("T", "O"), "x": ("T", "I"), "a": ("W", "I", "R"), "b": ("W", "R", "O"), "offsets": ("T",)}


@functools.cache
def _fused_kernel(dtype: torch.dtype) -> compiled.Kernel:
    """The fused kernel's package for stacks of ``dtype``, built at examples whose sizes all differ."""
    generator = torch.Generator().manual_seed(0)
    examples = [
        torch.randn(3, 48, generator=generator),  # y [T, O]
        torch.randn(3, 64, generator=generator),  # x [T, I]
        torch.randn(5, 64, 16, generator=generator),  # a [W, I, R]
        torch.randn(5, 16, 48, generator=generator),  # b [W, R, O]
    ]
    offsets = torch.tensor([0, 1, 4])
    return compiled.load_or_build(_fused_window_add, [*(t.to(dtype) for t in examples), offsets], _FUSED_SIZES)


def lora_add_fused(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, window: SlotWindow, offsets: torch.Tensor
) -> torch.Tensor:
    """``y + delta`` for a segment with a slot window (``offsets``: each row's slot - ``window.first``), by the
    ahead-of-time compiled kernel of the stacks' dtype (:func:`fused_kernel_works` builds it). Sizes are symbolic,
    so one package serves every module, rank, window width and row count of two or more. The package's code
    assumes the contiguous layouts it was exported with (the stacks' window views are; ``contiguous`` makes sure of
    the rows at no cost when they are too)."""
    a_view, b_view = a.narrow(0, window.first, window.width), b.narrow(0, window.first, window.width)
    return _fused_kernel(a.dtype)(y.contiguous(), x.contiguous(), a_view, b_view, offsets)


@functools.cache
def fused_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel builds and matches the reference here: CPU and a reduced-precision dtype only (on
    CUDA grouped_mm serves; float32 stacks gain nothing from it). Loads its AOTInductor package (built once per
    machine and torch version, then cached on disk) and checks it at sizes of two or more on views of one layer's
    stack at offset zero and beyond, under inference mode as the forward pass calls it."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    started = time.perf_counter()
    try:
        generator = torch.Generator().manual_seed(0)
        stacks_a = (torch.randn(2, 6, 64, 16, generator=generator) / 8).to(dtype)  # [layers, C, in, R]
        stacks_b = (torch.randn(2, 6, 16, 48, generator=generator) / 4).to(dtype)
        x = torch.randn(3, 64, generator=generator).to(dtype)
        y = torch.randn(3, 48, generator=generator).to(dtype)
        cases = ((0, SlotWindow(0, 3, None), [0, 1, 2]), (1, SlotWindow(1, 4, None), [1, 2, 4]))
        works = True
        with torch.inference_mode():
            for layer, window, slots in cases:
                a, b = stacks_a[layer], stacks_b[layer]
                offsets = torch.tensor(slots) - window.first
                got = lora_add_fused(y, x, a, b, window, offsets).float()
                want = y.float() + lora_delta_reference(x.float(), a.float(), b.float(), torch.tensor(slots))
                works = works and bool(torch.allclose(got, want, rtol=2e-2, atol=5e-2))
    except Exception as exc:  # any compiler or toolchain failure means: not here
        log.warning("fused LoRA kernel unavailable on %s/%s (%s): keeping float32 slot stacks", device, dtype, exc)
        return False
    log.info("fused LoRA kernel for %s ready in %.1f s: %s", dtype, time.perf_counter() - started, works)
    return works


@functools.cache
def _triton_lora() -> ModuleType | None:
    """The Triton kernels' module, or None where triton is not installed (imported on first use only)."""
    try:
        from loraplex.server.lora import triton_lora
    except ImportError:
        return None
    return triton_lora


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton kernels launch on ``device`` (CUDA with triton; CPU under ``TRITON_INTERPRET=1``)."""
    kernels = _triton_lora()
    return kernels is not None and kernels.runs_on(device)


def lora_add_triton(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, group_ends: torch.Tensor, groups: int
) -> None:
    """In place ``y += delta`` for a segment (rows sorted by slot) by the Triton shrink and expand launches."""
    lora_add_triton_slices((y,), x, (a,), (b,), group_ends, groups)


def lora_add_triton_slices(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    group_ends: torch.Tensor,
    groups: int,
) -> None:
    """In place ``ys[i] += delta(x, a[i], b[i])`` for a segment (rows sorted by slot) and up to three modules of
    its pool that share the input ``x`` (q/k/v, gate/up): one multi-slice shrink and one expand launch for all."""
    kernels = _triton_lora()
    if kernels is None:
        raise RuntimeError("the triton LoRA kernel needs the triton package")
    kernels.lora_add_sorted(ys, x, a, b, group_ends, groups)


def _triton_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels launch here and match the reference (a compiler or driver failure: not here)."""
    if not triton_runs(device):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5, 64, generator=generator).to(dtype)
        a = (torch.randn(3, 64, 16, generator=generator) / 8).to(dtype)
        b = (torch.randn(3, 16, 48, generator=generator) / 4).to(dtype)
        ends = torch.tensor([2, 2, 5], dtype=torch.int32)
        y = torch.zeros(5, 48, device=device, dtype=dtype)
        lora_add_triton(y, x.to(device), a.to(device), b.to(device), ends.to(device), 2)
        want = lora_delta_reference(x.float(), a.float(), b.float(), torch.tensor([0, 0, 2, 2, 2]))
        return bool(torch.allclose(y.float().cpu(), want, rtol=5e-2, atol=5e-2))
    except Exception as exc:  # any compiler or driver failure means: not here
        log.warning("Triton LoRA kernels unavailable on %s/%s: %s", device, dtype, exc)
        return False


def apply_dora(y: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """DoRA output ``bias + scale ⊙ (y - bias + delta)``: ``y, delta [T, out]``, ``scale [T, out]``."""
    if bias is None:
        return scale * (y + delta)
    return bias + scale * (y - bias + delta)


class LoraBackend(StrEnum):
    GROUPED = "grouped"
    GATHER = "gather"
    WINDOW = "window"
    PADDED = "padded"
    FUSED = "fused"
    TRITON = "triton"


def lora_delta(
    backend: LoraBackend,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    group_ends: torch.Tensor,
    window: SlotWindow | None = None,
    padded: PaddedGroups | None = None,
) -> torch.Tensor:
    """The segment's delta by ``backend`` (``window`` is required by the window kernel and ``padded`` by the
    padded one, unused by the others). The fused and Triton kernels add into the layer output instead
    (:func:`lora_add_fused`, :func:`lora_add_triton`)."""
    if backend in (LoraBackend.FUSED, LoraBackend.TRITON):
        raise ValueError(f"the {backend.value} kernel adds into the layer output: it computes no delta alone")
    if backend is LoraBackend.WINDOW:
        if window is None:
            raise ValueError("the window kernel needs the segment's slot window")
        return lora_delta_window(x, a, b, window)
    if backend is LoraBackend.PADDED:
        if padded is None:
            raise ValueError("the padded kernel needs the segment's padded layout")
        return lora_delta_padded(x, a, b, padded)
    kernel: LoraDelta = lora_delta_grouped if backend is LoraBackend.GROUPED else lora_delta_gather
    return kernel(x, a, b, slots, group_ends)


GATHER_MAX_ROWS = 64
GATHER_MAX_ROWS_PER_GROUP = 2.0
WINDOW_MAX_WIDTH_PER_ROW = 2.0
PADDED_MAX_ROWS_PER_ROW = 2.0


@dataclasses.dataclass(frozen=True)
class LoraKernels:
    """Which kernel computes a segment of ``rows`` rows over ``groups`` distinct adapters."""

    grouped_works: bool
    by_shape: bool  # False: always the preferred kernel (grouped where it works)
    forced: LoraBackend | None = None
    fused_works: bool = False  # the compiled fused kernel runs for these stacks (CPU, bf16/fp16)
    triton_works: bool = False  # the Triton kernels launch and match the reference here (CUDA)
    calibration: Calibration | None = None  # CUDA: the measured timings the choice follows

    @functools.cached_property
    def _calibrated_candidates(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The kernels a calibrated choice may pick for segments (with a slot window, without one)."""
        usable = [
            kernel.value
            for kernel, works in (
                (LoraBackend.GROUPED, self.grouped_works),
                (LoraBackend.WINDOW, True),
                (LoraBackend.GATHER, True),
                (LoraBackend.TRITON, self.triton_works),
            )
            if works
        ]
        return tuple(usable), tuple(kernel for kernel in usable if kernel != LoraBackend.WINDOW)

    def choose(
        self,
        rows: int,
        groups: int,
        window: SlotWindow | None = None,
        dora: bool = False,
        padded: PaddedGroups | None = None,
    ) -> LoraBackend:
        """The kernel of one segment; FUSED returns the layer output itself (``lora_add_fused``), not a delta, so
        it is never chosen for DoRA pools. ``padded`` is the segment's padded layout where it has one (groups of
        several rows within a narrow window, see :class:`PaddedGroups`)."""
        if self.forced is not None:
            return self.forced
        if self.calibration is not None:
            windowed, unwindowed = self._calibrated_candidates
            return LoraBackend(self.calibration.best(rows, groups, windowed if window is not None else unwindowed))
        if self.fused_works and window is not None and not dora and rows >= 2 and window.width >= 2:
            return LoraBackend.FUSED
        if window is not None and (self.by_shape or not self.grouped_works):
            return LoraBackend.WINDOW
        if padded is not None and self.by_shape:
            return LoraBackend.PADDED
        if not self.grouped_works:
            return LoraBackend.GATHER
        if self.by_shape and rows <= GATHER_MAX_ROWS and rows <= GATHER_MAX_ROWS_PER_GROUP * groups:
            return LoraBackend.GATHER
        return LoraBackend.GROUPED

    def describe(self) -> str:
        if self.forced is not None:
            return self.forced.value
        if self.calibration is not None:
            return self.calibration.describe()
        if not self.grouped_works:
            return LoraBackend.GATHER.value
        if not self.by_shape:
            return LoraBackend.GROUPED.value
        rows, per_group, width = GATHER_MAX_ROWS, GATHER_MAX_ROWS_PER_GROUP, WINDOW_MAX_WIDTH_PER_ROW
        windowed = "fused (compiled)" if self.fused_works else "window"
        return (
            f"by shape ({windowed} when every row has its own slot within {width:g}x the rows, padded when the "
            f"rows' groups pad to at most {PADDED_MAX_ROWS_PER_ROW:g}x the rows, gather up to {rows} rows and "
            f"{per_group:g} rows/adapter, else grouped)"
        )


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(5, 16, device=device, dtype=dtype)
        a = torch.randn(2, 16, 8, device=device, dtype=dtype)
        b = torch.randn(2, 8, 16, device=device, dtype=dtype)
        slots = torch.tensor([0, 0, 1, 1, 1], device=device)
        ends = torch.tensor([2, 5], device=device, dtype=torch.int32)
        got = lora_delta_grouped(x, a, b, slots, ends).float()
        want = lora_delta_reference(x.float(), a.float(), b.float(), slots)
        return bool(torch.allclose(got, want, rtol=5e-2, atol=5e-2))
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        log.info("grouped_mm unavailable on %s/%s: %s", device, dtype, exc)
        return False


def lora_stack_dtype(device: torch.device, model_dtype: torch.dtype, requested: str = "auto") -> torch.dtype:
    """The dtype of the slot stacks (and so of the LoRA math): ``float32``, ``model`` (the base's dtype), or
    ``auto``: the model's dtype, except on CPU where the fused kernel does not run (there bf16 ``bmm`` over one row
    per adapter is about 2x slower than float32 even with the cast of the rows in and out)."""
    if requested == "float32":
        return torch.float32
    if requested == "auto" and device.type == "cpu" and not fused_kernel_works(device, model_dtype):
        return torch.float32
    if requested in ("auto", "model"):
        return model_dtype
    raise ValueError(f"engine.lora_dtype={requested!r}: use auto, float32 or model")


def calibrate(
    device: torch.device,
    dtype: torch.dtype,
    kernels: LoraKernels,
    layer: LayerShape = DEFAULT_LAYER,
    buckets: tuple[tuple[int, int], ...] = BUCKETS,
    repeats: int = 10,
) -> Calibration:
    """Times each kernel ``kernels`` can run (grouped where it works, gather, window where every row has its own
    slot, Triton where it works) as ``y += delta`` over every linear of ``layer`` on stacks of ``dtype`` at each
    bucket of (rows, distinct adapters), the rows spread evenly over the adapters: the per-module kernels module by
    module, the Triton one as the forward pass runs it, one shrink and one expand launch per projection (q/k/v
    together, gate/up together)."""
    capacity = max(groups for _, groups in buckets)
    most_rows = max(rows for rows, _ in buckets)
    generator = torch.Generator().manual_seed(0)

    def random(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * scale).to(device, dtype)

    rank = layer.rank
    projections = [
        (
            random(most_rows, fan_in),
            [random(capacity, fan_in, rank, scale=fan_in**-0.5) for _ in outs],
            [random(capacity, rank, out, scale=1 / rank) for out in outs],
            [torch.zeros(most_rows, out, device=device, dtype=dtype) for out in outs],
        )
        for fan_in, outs in layer.projections
    ]

    def candidate(add: AddProjection, one_row_per_adapter: bool = False) -> Candidate:
        def make(rows: int, groups: int) -> Callable[[], object] | None:
            if one_row_per_adapter and rows != groups:
                return None
            slots = torch.arange(rows) * groups // rows
            ends = torch.bincount(slots, minlength=capacity).cumsum(0).to(device, torch.int32)
            slots = slots.to(device)
            parts = [([y[:rows] for y in ys], x[:rows], a, b) for x, a, b, ys in projections]

            def run() -> None:
                for ys, x, a, b in parts:
                    add(ys, x, a, b, slots, ends, groups)

            return run

        return make

    def per_module(kernel: LoraDelta) -> Candidate:
        def add(
            ys: Tensors, x: torch.Tensor, a: Tensors, b: Tensors, slots: torch.Tensor, ends: torch.Tensor, _: int
        ) -> None:
            for y, a_stack, b_stack in zip(ys, a, b, strict=True):
                y.add_(kernel(x, a_stack, b_stack, slots, ends))

        return candidate(add)

    def window(ys: Tensors, x: torch.Tensor, a: Tensors, b: Tensors, *_: object) -> None:
        for y, a_stack, b_stack in zip(ys, a, b, strict=True):
            y.add_(lora_delta_window(x, a_stack, b_stack, SlotWindow(0, x.shape[0], None)))

    def triton(
        ys: Tensors, x: torch.Tensor, a: Tensors, b: Tensors, _: torch.Tensor, ends: torch.Tensor, groups: int
    ) -> None:
        lora_add_triton_slices(ys, x, a, b, ends, groups)

    candidates: dict[str, Candidate] = {}
    if kernels.grouped_works:
        candidates[LoraBackend.GROUPED.value] = per_module(lora_delta_grouped)
    candidates[LoraBackend.GATHER.value] = per_module(lora_delta_gather)
    candidates[LoraBackend.WINDOW.value] = candidate(window, one_row_per_adapter=True)
    if kernels.triton_works:
        candidates[LoraBackend.TRITON.value] = candidate(triton)
    label = f"{device}/{str(dtype).removeprefix('torch.')} {layer.describe()}"
    with torch.inference_mode():
        return measure(label, device, candidates, buckets, repeats)


def select_kernels(
    device: torch.device,
    dtype: torch.dtype,
    requested: str = "auto",
    layer: LayerShape = DEFAULT_LAYER,
) -> LoraKernels:
    """The kernel rule for this device and dtype: ``auto`` (by the measured shape rule on CPU; on CUDA by a
    calibration run here, timing the kernels at a few (rows, adapters) buckets over one ``layer`` of the served
    base, logged and kept in :meth:`LoraKernels.describe`), or one kernel forced (``grouped``, ``gather``,
    ``triton``). Nothing is timed on CPU or when a kernel is forced."""
    forced = None if requested == "auto" else LoraBackend(requested)
    grouped_works = _grouped_mm_works(device, dtype)
    if forced is LoraBackend.GROUPED and not grouped_works:
        raise ValueError(
            f"engine.lora_kernel=grouped: torch._grouped_mm does not run on {device.type} with {dtype}; "
            "use auto or gather"
        )
    triton_works = (device.type == "cuda" or forced is LoraBackend.TRITON) and _triton_works(device, dtype)
    if forced is LoraBackend.TRITON and not triton_works:
        installed = "installed" if _triton_lora() is not None else "not installed"
        raise ValueError(
            f"engine.lora_kernel=triton: the Triton LoRA kernels need a CUDA device (here {device.type}, "
            f"{dtype}; triton {installed}); use auto"
        )
    kernels = LoraKernels(
        grouped_works=grouped_works,
        by_shape=device.type == "cpu",
        forced=forced,
        fused_works=fused_kernel_works(device, dtype),
        triton_works=triton_works,
    )
    if device.type != "cuda" or forced is not None:
        return kernels
    started = time.perf_counter()
    calibration = calibrate(device, dtype, kernels, layer)
    log.info("LoRA kernels calibrated in %.2f s: %s", time.perf_counter() - started, calibration.describe())
    return dataclasses.replace(kernels, calibration=calibration)
