"""The Triton LoRA kernels (under Triton's interpreter, in a subprocess) and the graph-safe row-slot entry point
(``lora_add_rows``, torch form) against the float64 per-token reference; the merged q/k/v and gate/up projection
(Triton's interpreter and the torch kernels) against the reference and the linears run alone; the CUDA kernel
calibration's choice and the layer shape it times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.server.config import EngineSettings
from loraplex.server.lora.calibration import Calibration, LayerShape, nearest_bucket
from loraplex.server.lora.layers import layer_shape
from loraplex.server.lora.ops import (
    LoraBackend,
    LoraKernels,
    SlotWindow,
    calibrate,
    lora_add_rows,
    lora_delta,
    lora_delta_reference,
    select_kernels,
)
from tests.support.shapes import TINY_SHAPE
from tests.support.triton_cases import CASES, DTYPES, projection_case

ROOT = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")


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


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    """Every case of tests/support/triton_cases.py run once by the Triton kernels under the interpreter, in a
    process of its own (the interpreter must be on before triton is first imported)."""
    pytest.importorskip("triton", reason="the Triton kernels' tests need the triton package")
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_cases"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results: dict[str, list[float]] = json.loads(done.stdout)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_kernels_match_reference(interpreted: dict[str, list[float]], case: str) -> None:
    """Within two roundings of the case's dtype (float32: IEEE dot) of the float64 reference."""
    error, scale = interpreted[case]
    dtype = DTYPES[case.split("-")[1]]
    assert error <= 2 * torch.finfo(dtype).eps * scale + 1e-5, (case, error, scale)


TIMINGS = {
    (1, 1): {"grouped": 0.05, "gather": 0.02, "window": 0.03, "triton": 0.04},
    (64, 64): {"grouped": 0.30, "gather": 0.20, "window": 0.08, "triton": 0.06},
    (1024, 8): {"grouped": 0.10, "gather": 1.50, "triton": 0.12},
}


def test_calibrated_choice_follows_the_nearest_bucket() -> None:
    calibration = Calibration("test", TIMINGS)
    assert nearest_bucket(TIMINGS, 48, 48) == (64, 64)
    assert nearest_bucket(TIMINGS, 512, 4) == (1024, 8)
    assert nearest_bucket(TIMINGS, 2, 2) == (1, 1)
    assert calibration.winners() == {(1, 1): "gather", (64, 64): "triton", (1024, 8): "grouped"}
    kernels = LoraKernels(grouped_works=True, by_shape=False, triton_works=True, calibration=calibration)
    window = SlotWindow(0, 48, None)
    assert kernels.choose(48, 48, window) is LoraBackend.TRITON
    assert kernels.choose(700, 6) is LoraBackend.GROUPED
    assert kernels.choose(1, 1, SlotWindow(0, 1, None)) is LoraBackend.GATHER
    # without Triton, the window kernel wins decode; it is never chosen for a segment without a window
    no_triton = LoraKernels(grouped_works=True, by_shape=False, calibration=calibration)
    assert no_triton.choose(48, 48, window) is LoraBackend.WINDOW
    assert no_triton.choose(48, 48) is LoraBackend.GATHER
    # without grouped_mm, prefill falls to the next fastest measured kernel
    assert LoraKernels(False, False, triton_works=True, calibration=calibration).choose(700, 6) is LoraBackend.TRITON
    assert "64 rows/64 adapters" in kernels.describe() and "triton 0.060" in kernels.describe()


def test_calibration_measures_every_kernel_that_runs() -> None:
    """A real (small, CPU) calibration run over a layer of the tiny shape: every bucket times the kernels that can
    serve it, and the label names what was timed."""
    kernels = LoraKernels(grouped_works=True, by_shape=False)
    buckets = ((4, 4), (32, 2))
    layer = layer_shape(TINY_SHAPE, 8)
    calibration = calibrate(CPU, torch.float32, kernels, layer, buckets=buckets, repeats=2)
    assert set(calibration.timings[(4, 4)]) == {"grouped", "gather", "window"}
    assert set(calibration.timings[(32, 2)]) == {"grouped", "gather"}  # no window: rows share adapters
    assert all(ms > 0 for row in calibration.timings.values() for ms in row.values())
    assert calibration.label == "cpu/float32 rank 8, 64->64+32+32, 64->64, 64->128+128, 128->64"


def test_layer_shape_groups_the_linears_as_the_forward_pass_runs_them() -> None:
    assert layer_shape(TINY_SHAPE, 16) == LayerShape(
        16, ((64, (64, 32, 32)), (64, (64,)), (64, (128, 128)), (128, (64,)))
    )


@pytest.mark.parametrize("kernel", ["auto", "gather", "grouped"])
@pytest.mark.parametrize("form", ["eager", "rows", "permodule", "dora"])
@pytest.mark.parametrize("group", ["q_proj", "gate_proj"])
def test_projection_with_torch_kernels_matches_reference(group: str, form: str, kernel: str) -> None:
    """The merged projection on CPU without Triton (each module by the torch kernels; the static ``rows`` form by
    the torch form of ``lora_add_rows_slices``) over pools of ranks 8/16/32 targeting q,v / everything / up,down and
    base rows: the float64 reference, and the linears run one by one, within float32 rounding."""
    error, scale = projection_case(group, "float32", form, kernels=select_kernels(CPU, torch.float32, kernel))
    assert error <= 2 * torch.finfo(torch.float32).eps * scale + 1e-5, (error, scale)


def test_forcing_triton_where_it_cannot_run_is_refused() -> None:
    with pytest.raises(ValueError, match="the Triton LoRA kernels need a CUDA device"):
        select_kernels(CPU, torch.float32, "triton")
    assert EngineSettings(lora_kernel="triton").lora_kernel == "triton"
    with pytest.raises(ValueError, match="lora_kernel"):
        EngineSettings(lora_kernel="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adds into the layer output"):
        x, a, b = torch.zeros(1, 4), torch.zeros(2, 4, 2), torch.zeros(2, 2, 4)
        lora_delta(LoraBackend.TRITON, x, a, b, torch.zeros(1, dtype=torch.long), torch.ones(2, dtype=torch.int32))
