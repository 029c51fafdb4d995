"""Paged attention in place (server/model/paged_attention.py) against attention.py's written-out reference.

The Triton kernel runs on CPU under Triton's interpreter, which must be switched on before triton is first
imported: the whole table of kernel cases runs once, in one subprocess with ``TRITON_INTERPRET=1``, and the
comparisons happen here. Cases mix context lengths (partial last blocks, a one-key sequence, an empty padded row),
shuffled non-contiguous blocks, GQA with a group that is not a power of two, a head size that is not one, and
prefill chunks longer than one query tile.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loraplex.server.model.attention import SequenceSpan, reference_attention
from loraplex.server.model.paged_attention import choose_decode_attention, paged_decode_attention_torch

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Case:
    steps: tuple[tuple[int, int], ...]  # (context, rows) per sequence; rows == 0 marks an empty padded decode row
    heads: int = 6
    kv_heads: int = 2
    head_dim: int = 8
    block: int = 4
    dtype: torch.dtype = torch.float32


DECODE = ((5, 1), (17, 1), (0, 1), (8, 1), (3, 1), (31, 1))
CASES = {
    "decode gqa": Case(DECODE),
    "decode with a padded row": Case(((6, 1), (0, 0), (12, 1))),
    "decode mha, block 16, head 64": Case(
        ((40, 1), (15, 1), (16, 1), (0, 1)), heads=4, kv_heads=4, head_dim=64, block=16
    ),
    "decode head 48, group 4": Case(((9, 1), (22, 1)), heads=8, kv_heads=2, head_dim=48, block=8),
    "decode bfloat16": Case(DECODE, dtype=torch.bfloat16),
    "decode float16": Case(DECODE, dtype=torch.float16),
    "prefill and decode": Case(((0, 7), (12, 1), (3, 1), (6, 5), (0, 1), (20, 3))),
    "long chunk after context": Case(((9, 37), (0, 20))),
    "block 1": Case(((4, 3), (7, 1)), block=1),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """q, caches, block tables (shuffled blocks, a free block past each table's end), seq lens, query starts."""
    rng = random.Random(seed)
    num_blocks = sum(-(-(c + n) // case.block) for c, n in case.steps) + 8
    free = list(range(num_blocks))
    rng.shuffle(free)
    width = max(-(-(c + n) // case.block) for c, n in case.steps) + 1
    tables, lens, starts = [], [], [0]
    for context, rows in case.steps:
        need = -(-(context + rows) // case.block)
        blocks, free = free[:need], free[need:]
        tables.append(blocks + [free[0]] * (width - need))
        lens.append(context + rows if rows else 0)
        starts.append(starts[-1] + max(rows, 1))  # a padded row still has its query
    generator = torch.Generator().manual_seed(seed)
    slots = num_blocks * case.block
    return {
        "q": torch.randn(starts[-1], case.heads, case.head_dim, generator=generator).to(case.dtype),
        "k": torch.randn(slots, case.kv_heads, case.head_dim, generator=generator).to(case.dtype),
        "v": torch.randn(slots, case.kv_heads, case.head_dim, generator=generator).to(case.dtype),
        "tables": torch.tensor(tables, dtype=torch.int32),
        "lens": torch.tensor(lens, dtype=torch.int32),
        "starts": torch.tensor(starts, dtype=torch.int32),
    }


def _reference(case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """reference_attention over the real rows (float64 inside); an empty padded row's output is zeros."""
    spans, rows = [], []
    for index, (context, count) in enumerate(case.steps):
        start = int(inputs["starts"][index])
        if count:
            need = -(-(context + count) // case.block)
            spans.append(SequenceSpan(start, count, context, inputs["tables"][index, :need].tolist()))
            rows.append(start)
    q = inputs["q"].float()
    out = reference_attention(q.double(), inputs["k"].double(), inputs["v"].double(), spans, case.block)
    for index, (_, count) in enumerate(case.steps):
        if not count:
            out[int(inputs["starts"][index])] = 0.0
    return out


def run_kernel_cases(inputs_path: str, outputs_path: str) -> None:
    """In the interpreter's subprocess: the Triton kernel over every case of ``inputs_path``."""
    from loraplex.server.model.paged_attention import paged_attention_triton

    cases = torch.load(inputs_path)
    outputs = {}
    for name, (block, inputs) in cases.items():
        max_rows = int((inputs["starts"][1:] - inputs["starts"][:-1]).max())
        outputs[name] = paged_attention_triton(
            inputs["q"], inputs["k"], inputs["v"], inputs["tables"], inputs["lens"], inputs["starts"], max_rows, block
        )
    torch.save(outputs, outputs_path)


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("paged")
    inputs = {name: (case.block, _inputs(case, seed)) for seed, (name, case) in enumerate(CASES.items())}
    torch.save(inputs, folder / "inputs.pt")
    script = (
        "import sys; from tests.unit.engine.test_paged_attention import run_kernel_cases; "
        "run_kernel_cases(sys.argv[1], sys.argv[2])"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    outputs: dict[str, torch.Tensor] = torch.load(folder / "outputs.pt")
    return outputs


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_matches_reference(name: str, kernel_outputs: dict[str, torch.Tensor]) -> None:
    case = CASES[name]
    inputs = _inputs(case, list(CASES).index(name))
    got = kernel_outputs[name]
    assert got.dtype == case.dtype and got.shape == inputs["q"].shape
    want = _reference(case, inputs)
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[case.dtype], atol=TOLERANCE[case.dtype])


DECODE_CASES = [name for name, case in CASES.items() if all(rows <= 1 for _, rows in case.steps)]


@pytest.mark.parametrize("name", DECODE_CASES)
def test_torch_decode_form_matches_reference(name: str) -> None:
    case = CASES[name]
    inputs = _inputs(case, list(CASES).index(name))
    got = paged_decode_attention_torch(
        inputs["q"], inputs["k"], inputs["v"], inputs["tables"], inputs["lens"], case.block
    )
    assert got.dtype == case.dtype
    want = _reference(case, inputs)
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[case.dtype], atol=TOLERANCE[case.dtype])


def test_keys_past_a_sequence_length_are_never_read() -> None:
    """Keys beyond ``seq_lens`` in a table's blocks (the rest of a partial block, blocks past its end) change
    nothing: a form that read them, or one that dropped the last key, differs."""
    case = CASES["decode gqa"]
    inputs = _inputs(case, 0)
    before = paged_decode_attention_torch(inputs["q"], inputs["k"], inputs["v"], inputs["tables"], inputs["lens"], 4)
    k, v = inputs["k"].clone(), inputs["v"].clone()
    read = {
        int(inputs["tables"][row, p // 4]) * 4 + p % 4
        for row in range(len(case.steps))
        for p in range(inputs["lens"][row])
    }
    unread = torch.tensor([slot for slot in range(k.shape[0]) if slot not in read])
    k[unread], v[unread] = 50.0, -50.0
    after = paged_decode_attention_torch(inputs["q"], k, v, inputs["tables"], inputs["lens"], 4)
    assert torch.equal(before, after)
    last = int(inputs["tables"][0, 1]) * 4 + 1  # sequence 0 holds 6 keys: its last is position 5
    v[last] += 1.0
    assert not torch.allclose(
        paged_decode_attention_torch(inputs["q"], k, v, inputs["tables"], inputs["lens"], 4)[0], before[0]
    )


def test_cpu_calibration_takes_the_torch_form() -> None:
    choice = choose_decode_attention(torch.device("cpu"), torch.float32, 6, 2, 8, 4, 16)
    assert choice.name == "sdpa-gather" and choice.attend is paged_decode_attention_torch and not choice.timings_ms
