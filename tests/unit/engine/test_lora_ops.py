"""The batched LoRA math: every backend against the per-token reference, across ranks, slot counts and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import AdapterLimits, read_adapter
from loraplex.server.lora.layers import LoraLinear, LoraProjection
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import (
    LoraBackend,
    LoraKernels,
    PaddedGroups,
    SlotWindow,
    apply_dora,
    fused_kernel_works,
    lora_add_fused,
    lora_delta,
    lora_delta_gather,
    lora_delta_grouped,
    lora_delta_padded,
    lora_delta_reference,
    lora_delta_window,
    lora_stack_dtype,
    select_kernels,
)
from loraplex.server.lora.pool import DeviceSlots, PoolKey, SlotPool
from tests.support.adapters import write_adapter
from tests.support.shapes import TINY_SHAPE

CPU = torch.device("cpu")

CASES = [
    # (tokens, slots, rank, fan_in, fan_out)
    (1, 1, 8, 64, 64),
    (7, 3, 8, 576, 192),
    (32, 32, 16, 576, 1536),  # decode batch, every token its own adapter (SmolLM2 gate_proj)
    (33, 4, 64, 1536, 576),  # down_proj, few adapters
    (300, 8, 32, 576, 576),  # prefill-sized
]


def _case(tokens: int, slots: int, rank: int, fan_in: int, fan_out: int, seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, fan_in, generator=generator).to(dtype)
    a = (torch.randn(slots, fan_in, rank, generator=generator) / fan_in**0.5).to(dtype)
    b = (torch.randn(slots, rank, fan_out, generator=generator) / rank).to(dtype)
    slot_of = torch.sort(torch.randint(0, slots, (tokens,), generator=generator)).values
    ends = torch.bincount(slot_of, minlength=slots).cumsum(0).to(torch.int32)
    return x, a, b, slot_of, ends


@pytest.mark.parametrize(("tokens", "slots", "rank", "fan_in", "fan_out"), CASES)
@pytest.mark.parametrize("fast", [lora_delta_grouped, lora_delta_gather])
def test_fast_paths_match_reference_fp32(fast, tokens: int, slots: int, rank: int, fan_in: int, fan_out: int) -> None:
    x, a, b, slot_of, ends = _case(tokens, slots, rank, fan_in, fan_out, seed=tokens + slots, dtype=torch.float32)
    want = lora_delta_reference(x.double(), a.double(), b.double(), slot_of).float()
    got = fast(x, a, b, slot_of, ends)
    assert got.shape == (tokens, fan_out)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5


@pytest.mark.parametrize(
    ("slot_list", "window"),
    [
        ([3, 4, 5, 6], SlotWindow(3, 4, None)),  # the rows fill the window: pure views
        ([1, 2, 4, 7], SlotWindow(1, 7, torch.tensor([0, 1, 3, 6]))),  # gaps: empty slots computed as zeros
        ([5], SlotWindow(5, 1, None)),
    ],
)
def test_window_kernel_matches_reference(slot_list: list[int], window: SlotWindow) -> None:
    generator = torch.Generator().manual_seed(len(slot_list))
    x = torch.randn(len(slot_list), 48, generator=generator)
    a = torch.randn(8, 48, 6, generator=generator)
    b = torch.randn(8, 6, 40, generator=generator)
    slots = torch.tensor(slot_list)
    want = lora_delta_reference(x.double(), a.double(), b.double(), slots).float()
    torch.testing.assert_close(lora_delta_window(x, a, b, window), want, rtol=1e-5, atol=1e-5)
    ends = torch.bincount(slots, minlength=8).cumsum(0).to(torch.int32)
    torch.testing.assert_close(lora_delta(LoraBackend.WINDOW, x, a, b, slots, ends, window), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slot window"):
        lora_delta(LoraBackend.WINDOW, x, a, b, slots, ends)


@pytest.mark.parametrize(
    "group_rows",
    [
        {2: 3, 3: 1, 5: 4},  # groups of different depths, an empty slot (4) inside the window
        {0: 2, 1: 2},
        {6: 5},  # one adapter's prompt chunk
    ],
)
def test_padded_kernel_matches_reference(group_rows: dict[int, int]) -> None:
    """Prefill-shaped segments (several rows per slot): the padded layout the mapping builds, through the padded
    kernel, against the per-token reference; through ``lora_delta`` too, which needs the layout."""
    pool = SlotPool(PoolKey(6, ("q_proj", "v_proj"), False), TINY_SHAPE, 8, torch.float32, torch.device("cpu"))
    segment = LoraMapping.build([(pool, slot, n) for slot, n in group_rows.items()], torch.device("cpu")).segments[0]
    assert segment.padded is not None and segment.window is None
    generator = torch.Generator().manual_seed(len(group_rows))
    x = torch.randn(segment.end, 48, generator=generator)
    a = torch.randn(8, 48, 6, generator=generator)
    b = torch.randn(8, 6, 40, generator=generator)
    want = lora_delta_reference(x.double(), a.double(), b.double(), segment.slots).float()
    torch.testing.assert_close(lora_delta_padded(x, a, b, segment.padded), want, rtol=1e-5, atol=1e-5)
    got = lora_delta(LoraBackend.PADDED, x, a, b, segment.slots, segment.group_ends, None, segment.padded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padded layout"):
        lora_delta(LoraBackend.PADDED, x, a, b, segment.slots, segment.group_ends)


def test_mapping_pads_only_when_padding_is_cheap() -> None:
    """The layout ``[width, depth]``: each row's index is its slot's offset times the depth plus its place in its
    group; none when padding to the deepest group over the slots' window exceeds 2x the rows, or for one row a
    slot (the window kernels' case)."""
    pool = SlotPool(PoolKey(8, ("q_proj", "v_proj"), False), TINY_SHAPE, 16, torch.float32, torch.device("cpu"))
    cpu = torch.device("cpu")

    def padded(groups: list[tuple[int, int]]) -> PaddedGroups | None:
        return LoraMapping.build([(pool, slot, n) for slot, n in groups], cpu).segments[0].padded

    layout = padded([(3, 2), (5, 3)])
    assert layout is not None and (layout.first, layout.width, layout.depth) == (3, 3, 3)
    assert layout.index.tolist() == [0, 1, 6, 7, 8]
    assert padded([(0, 12), (1, 1), (2, 1)]) is None  # 3 x 12 padded rows for 14
    assert padded([(0, 2), (15, 2)]) is None  # 16 slots wide for 4 rows
    assert padded([(2, 1), (3, 1)]) is None  # decode rows: a window instead


def test_cpu_rule_takes_the_padded_kernel_for_prefill_groups() -> None:
    """On CPU a padded layout wins over gather and grouped (bench_lora_ops: 32 groups of 25 rows, bf16, 576 ->
    576: 0.12 ms against grouped's 0.96); on CUDA (not by shape) grouped keeps them."""
    layout = PaddedGroups(0, 4, 25, torch.arange(100))
    cpu = LoraKernels(grouped_works=True, by_shape=True)
    assert cpu.choose(rows=100, groups=4, padded=layout) is LoraBackend.PADDED
    assert cpu.choose(rows=100, groups=4) is LoraBackend.GROUPED
    cuda = LoraKernels(grouped_works=True, by_shape=False)
    assert cuda.choose(rows=100, groups=4, padded=layout) is LoraBackend.GROUPED


def test_grouped_handles_empty_groups_and_single_group() -> None:
    x, a, b, _, _ = _case(10, 6, 8, 32, 48, seed=3, dtype=torch.float32)
    slot_of = torch.full((10,), 4)
    ends = torch.tensor([0, 0, 0, 0, 10, 10], dtype=torch.int32)
    want = (x @ a[4]) @ b[4]
    torch.testing.assert_close(lora_delta_grouped(x, a, b, slot_of, ends), want, rtol=1e-5, atol=1e-5)


def test_zero_padded_rank_equals_native_rank() -> None:
    """An adapter of rank 5 stored in a rank-8 bucket (zeros after row 5) computes its own rank-5 delta."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 40, generator=generator)
    a5, b5 = torch.randn(40, 5, generator=generator), torch.randn(5, 24, generator=generator)
    a = torch.zeros(1, 40, 8)
    b = torch.zeros(1, 8, 24)
    a[0, :, :5], b[0, :5] = a5, b5
    got = lora_delta_grouped(x, a, b, torch.zeros(4, dtype=torch.long), torch.tensor([4], dtype=torch.int32))
    torch.testing.assert_close(got, (x @ a5) @ b5, rtol=1e-5, atol=1e-5)


def test_apply_dora_matches_definition() -> None:
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(6, 5, generator=generator), torch.randn(6, generator=generator)
    x, delta, scale = torch.randn(3, 5, generator=generator), torch.randn(3, 6, generator=generator), torch.rand(3, 6)
    y = x @ weight.T + bias
    want = bias + scale * (x @ weight.T + delta)
    torch.testing.assert_close(apply_dora(y, delta, bias, scale), want)
    torch.testing.assert_close(apply_dora(x @ weight.T, delta, None, scale), scale * (x @ weight.T + delta))


def test_cpu_kernels_are_chosen_by_the_segment_shape() -> None:
    kernels = select_kernels(torch.device("cpu"), torch.float32)
    assert kernels.grouped_works
    assert kernels.choose(rows=32, groups=32) is LoraBackend.GATHER  # decode, one row per adapter
    assert kernels.choose(rows=32, groups=16) is LoraBackend.GATHER
    assert kernels.choose(rows=32, groups=4) is LoraBackend.GROUPED  # many rows per adapter
    assert kernels.choose(rows=512, groups=512) is LoraBackend.GROUPED  # beyond GATHER_MAX_ROWS
    assert kernels.choose(rows=1, groups=1) is LoraBackend.GATHER
    window = SlotWindow(0, 32, None)
    assert kernels.choose(rows=32, groups=32, window=window) is LoraBackend.WINDOW  # decode over distinct adapters
    assert LoraKernels(grouped_works=True, by_shape=False).choose(32, 32, window) is LoraBackend.GROUPED  # CUDA
    assert LoraKernels(grouped_works=False, by_shape=False).choose(32, 32, window) is LoraBackend.WINDOW
    assert select_kernels(torch.device("cpu"), torch.float32, "gather").choose(32, 32, window) is LoraBackend.GATHER
    fused = select_kernels(torch.device("cpu"), torch.bfloat16)
    assert fused.fused_works and "fused" in fused.describe()
    assert fused.choose(rows=32, groups=32, window=window) is LoraBackend.FUSED  # decode over distinct adapters
    assert fused.choose(rows=32, groups=32, window=window, dora=True) is LoraBackend.WINDOW  # DoRA needs the delta
    assert fused.choose(rows=1, groups=1, window=SlotWindow(3, 1, None)) is LoraBackend.WINDOW  # size one: eager
    assert fused.choose(rows=32, groups=32) is LoraBackend.GATHER  # no window
    assert fused.choose(rows=300, groups=8) is LoraBackend.GROUPED  # prefill


def test_forced_and_unavailable_kernels() -> None:
    forced = select_kernels(torch.device("cpu"), torch.float32, requested="grouped")
    assert forced.choose(rows=32, groups=32) is LoraBackend.GROUPED
    assert forced.describe() == "grouped"
    assert select_kernels(torch.device("cpu"), torch.float32, requested="gather").choose(512, 1) is LoraBackend.GATHER
    # float64 has no grouped_mm on CPU: auto falls back to gather, a forced grouped is refused with the fix
    assert select_kernels(torch.device("cpu"), torch.float64).choose(rows=512, groups=1) is LoraBackend.GATHER
    with pytest.raises(ValueError, match="use auto or gather"):
        select_kernels(torch.device("cpu"), torch.float64, requested="grouped")
    assert LoraKernels(grouped_works=False, by_shape=True).choose(rows=512, groups=1) is LoraBackend.GATHER
    assert LoraKernels(grouped_works=True, by_shape=False).choose(rows=32, groups=32) is LoraBackend.GROUPED


def test_lora_stack_dtype_rule() -> None:
    cuda = torch.device("cuda")
    fused = fused_kernel_works(CPU, torch.bfloat16)
    assert fused  # this machine has a C++ compiler: TorchInductor builds the fused kernel
    assert lora_stack_dtype(CPU, torch.bfloat16) is torch.bfloat16  # auto on CPU with the fused kernel
    assert lora_stack_dtype(CPU, torch.float32) is torch.float32
    assert not fused_kernel_works(CPU, torch.float32)  # float32 stacks keep the eager kernels
    assert lora_stack_dtype(cuda, torch.bfloat16) is torch.bfloat16  # auto elsewhere: the model's dtype
    assert lora_stack_dtype(CPU, torch.bfloat16, "model") is torch.bfloat16
    assert lora_stack_dtype(cuda, torch.bfloat16, "float32") is torch.float32
    with pytest.raises(ValueError, match="use auto, float32 or model"):
        lora_stack_dtype(CPU, torch.float32, "float16")


def test_float32_stacks_under_a_bfloat16_base_add_the_float32_delta(tmp_path: Path) -> None:
    """A bf16 base linear with float32 slot stacks: the rows are cast to float32 for the LoRA math and its delta is
    added to the bf16 output, for every kernel (decode window, gather, grouped prefill)."""
    shape = ModelShape("llama", 64, 2, 4, 2, 16, 128, 100)
    weights = [
        read_adapter(
            name,
            write_adapter(tmp_path / name, shape, 8, seed=seed),
            shape,
            AdapterLimits(max_rank=64, max_file_bytes=1 << 30),
        )
        for seed, name in enumerate(("a", "b", "c"))
    ]
    slots = DeviceSlots(shape, 8, 1 << 30, torch.float32, CPU)
    placements = [slots.place(w) for w in weights]
    assert all(placement is not None for placement in placements)
    base = torch.nn.Linear(64, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(6, 64).to(torch.bfloat16)
    for rows in ([(0, 1), (1, 1), (2, 1)], [(0, 2), (1, 2), (2, 2)], [(0, 6)]):  # window, gather, grouped
        mapping = LoraMapping.build([(placements[i].pool, placements[i].slot, n) for i, n in rows], CPU)  # type: ignore[union-attr]
        n_rows = sum(n for _, n in rows)
        for backend in (LoraBackend.WINDOW, LoraBackend.GATHER, LoraBackend.GROUPED):
            kernels = LoraKernels(grouped_works=True, by_shape=False, forced=backend)
            if backend is LoraBackend.WINDOW and mapping.segments[0].window is None:
                continue
            got = LoraProjection([LoraLinear(base, 1, "q_proj")], kernels)(x[:n_rows], mapping)[0]
            assert got.dtype is torch.bfloat16
            want = base(x[:n_rows]).float()
            row = 0
            for index, count in rows:
                module = weights[index].modules[(1, "q_proj")]
                want[row : row + count] += (x[row : row + count].float() @ module.a.T) @ module.b.T
                row += count
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("slot_list", "first", "width", "rank", "fan_in", "fan_out"),
    [
        ([0, 1, 2, 3], 0, 4, 8, 576, 192),  # the window at offset zero of the stack, rows fill it
        ([5, 6, 8, 11], 5, 7, 16, 576, 1536),  # gaps: empty slots see zero rows
        ([2, 3], 2, 2, 64, 1536, 576),
        (list(range(3, 35)), 3, 32, 16, 576, 576),  # a decode batch of 32 adapters
    ],
)
def test_fused_kernel_matches_reference(
    dtype: torch.dtype, slot_list: list[int], first: int, width: int, rank: int, fan_in: int, fan_out: int
) -> None:
    """``y + delta`` from the compiled kernel against float64 (reduced-precision inputs, float32 accumulation, one
    rounding into the output dtype), on per-layer stacks of another layer than the first, as the pool holds them."""
    generator = torch.Generator().manual_seed(rank + width)
    rows = len(slot_list)
    layers_a = [(torch.randn(40, fan_in, rank, generator=generator) / fan_in**0.5).to(dtype) for _ in range(2)]
    layers_b = [(torch.randn(40, rank, fan_out, generator=generator) / rank**0.5).to(dtype) for _ in range(2)]
    a, b = layers_a[1], layers_b[1]
    hidden = torch.randn(rows + 2, fan_in, generator=generator).to(dtype)
    x = hidden[1 : rows + 1]  # a row range of the step's batch: a view, as in the forward pass
    y = torch.randn(rows, fan_out, generator=generator).to(dtype)
    slots = torch.tensor(slot_list)
    window = SlotWindow(first, width, None if width == rows else slots - first)
    with torch.inference_mode():
        got = lora_add_fused(y, x, a, b, window, slots - first)
    assert got.dtype is dtype and got.shape == (rows, fan_out)
    want = y.double() + lora_delta_reference(x.double(), a.double(), b.double(), slots)
    rounding = torch.finfo(dtype).eps * want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 2 * rounding + 1e-3
    assert not torch.equal(got, y)  # the delta was added


def test_fused_kernel_through_lora_linear_with_bf16_stacks(tmp_path: Path) -> None:
    """A bf16 base with bf16 slot stacks: the decode window goes through the fused kernel and equals the float32
    definition within bf16 rounding; a DoRA-free gather and a grouped prefill over the same stacks agree too."""
    shape = ModelShape("llama", 64, 2, 4, 2, 16, 128, 100)
    weights = [
        read_adapter(
            name,
            write_adapter(tmp_path / name, shape, 8, seed=seed),
            shape,
            AdapterLimits(max_rank=64, max_file_bytes=1 << 30),
        )
        for seed, name in enumerate(("a", "b", "c"))
    ]
    slots = DeviceSlots(shape, 8, 1 << 30, torch.bfloat16, CPU)
    placements = [slots.place(w) for w in weights]
    assert all(placement is not None for placement in placements)
    base = torch.nn.Linear(64, 64, bias=True).to(torch.bfloat16)
    kernels = select_kernels(CPU, torch.bfloat16)
    x = torch.randn(6, 64).to(torch.bfloat16)
    for rows, backend in (
        ([(0, 1), (1, 1), (2, 1)], LoraBackend.FUSED),
        ([(0, 2), (1, 2), (2, 2)], LoraBackend.GATHER),
        ([(0, 6)], LoraBackend.GROUPED),
    ):
        mapping = LoraMapping.build([(placements[i].pool, placements[i].slot, n) for i, n in rows], CPU)  # type: ignore[union-attr]
        segment = mapping.segments[0]
        assert kernels.choose(segment.end - segment.start, segment.groups, segment.window) is backend
        n_rows = sum(n for _, n in rows)
        with torch.inference_mode():
            got = LoraProjection([LoraLinear(base, 1, "q_proj")], kernels)(x[:n_rows], mapping)[0]
        want = base(x[:n_rows]).float()
        assert got.dtype is torch.bfloat16
        row = 0
        for index, count in rows:
            module = weights[index].modules[(1, "q_proj")]
            want[row : row + count] += (x[row : row + count].float() @ module.a.T) @ module.b.T
            row += count
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=3e-2)
