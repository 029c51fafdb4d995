"""CUDA paths (run with ``-m gpu`` on a GPU machine): LoRA backends, the engine against PEFT on the device, and the
engine's CUDA-graph decode steps against its eager ones.

Random-weight Llama bases (no downloads); float32 for exact agreement, nf4 with bfloat16 compute (the CUDA
default) for agreement within bfloat16 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loadtests.random_model import write_random_llama
from loraplex.server.config import ModelSettings
from loraplex.server.core.types import GenerationRequest, SamplingParams
from loraplex.server.engine.engine import Engine, describe
from loraplex.server.lora.layers import layer_shape
from loraplex.server.lora.ops import LoraBackend, lora_add_triton, lora_delta, lora_delta_reference, select_kernels
from loraplex.server.model.loader import LoadedBase, load_base
from loraplex.server.model.quantize import quantization_config
from tests.integration.engine.conftest import make_engine, run_all
from tests.support.adapters import ALL_LINEAR, QV, write_adapter
from tests.support.peft_oracle import peft_generate, peft_logits, peft_with_adapters
from tests.support.triton_cases import CASES, DTYPES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r8": {"rank": 8, "targets": QV, "strength": 40.0},
    "all-r16": {"rank": 16, "targets": ALL_LINEAR, "strength": 20.0},
    "qv-r32": {"rank": 32, "targets": QV, "strength": 40.0},
    "qv-r8-dora": {"rank": 8, "targets": QV, "use_dora": True, "strength": 40.0},
}
MAX_NEW = 10


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_backends_on_cuda_match_reference(dtype: torch.dtype, tolerance: float) -> None:
    backend = select_kernels(CUDA, dtype).choose(rows=96, groups=16)
    print(f"{dtype}: kernel {backend.value}")
    generator = torch.Generator().manual_seed(0)
    tokens, slots, rank, fan_in, fan_out = 96, 16, 16, 4096, 14336
    x = torch.randn(tokens, fan_in, generator=generator)
    a = torch.randn(slots, fan_in, rank, generator=generator) / fan_in**0.5
    b = torch.randn(slots, rank, fan_out, generator=generator) / rank
    slot_of = torch.sort(torch.randint(0, slots, (tokens,), generator=generator)).values
    ends = torch.bincount(slot_of, minlength=slots).cumsum(0).to(torch.int32)
    want = lora_delta_reference(x.double(), a.double(), b.double(), slot_of)
    x, a, b, slot_of, ends = x.to(CUDA, dtype), a.to(CUDA, dtype), b.to(CUDA, dtype), slot_of.to(CUDA), ends.to(CUDA)
    if backend is LoraBackend.TRITON:  # adds into the output
        got = torch.zeros(tokens, fan_out, device=CUDA, dtype=dtype)
        lora_add_triton(got, x, a, b, ends, int(torch.unique(slot_of).numel()))
    else:
        got = lora_delta(backend, x, a, b, slot_of, ends)
    error = torch.linalg.norm(got.double().cpu() - want) / torch.linalg.norm(want)
    assert error < tolerance


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_kernels_on_cuda_match_reference(case: str) -> None:
    """The interpreter's cases (tests/support/triton_cases.py), compiled and run on the device."""
    error, scale = CASES[case](device="cuda")
    assert error <= 2 * torch.finfo(DTYPES[case.split("-")[1]]).eps * scale + 1e-5, (case, error, scale)


def test_calibration_on_cuda_times_the_triton_kernels() -> None:
    kernels = select_kernels(CUDA, torch.bfloat16)
    assert kernels.triton_works and kernels.calibration is not None
    print(kernels.describe())
    assert all("triton" in row for row in kernels.calibration.timings.values())


def test_engine_on_cuda_with_triton_kernels_matches_peft(random_base: Path, tmp_path: Path) -> None:
    base = load_base(ModelSettings(base_model=str(random_base), device="cuda", quantization="none", dtype="float32"))
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        write_adapter(tmp_path / name, base.shape, seed=seed, **kwargs)
    peft = _peft(random_base, tmp_path, dtype=torch.float32, device_map={"": "cuda"})
    agreement, worst = _compare(base, tmp_path, peft, lora_kernel="triton")
    print(f"float32 on CUDA, Triton LoRA kernels: token agreement {agreement:.2f}, max |dlogprob| {worst:.2e}")
    assert agreement == 1.0 and worst <= 1e-3


@pytest.fixture(scope="module")
def random_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("base"), "tiny", torch.float32, seed=1)


def _peft(base_dir: Path, root: Path, **load: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return peft_with_adapters(AutoModelForCausalLM.from_pretrained(base_dir, **load), root, list(ADAPTERS))


def _prompt(index: int) -> tuple[int, ...]:
    """The prompt of the request at ``index`` in the comparison batches (distinct token ranges)."""
    return tuple(range(10 + 7 * index, 30 + 7 * index))


def _greedy(engine: Engine, names: list[str | None], first: int = 0) -> list[tuple[list[int], list[float]]]:
    """(tokens, log-probabilities) of one greedy request per adapter name (None: base), prompts by position."""
    prompts = [_prompt(i) for i in range(first, first + len(names))]
    outcomes = run_all(
        engine,
        [
            GenerationRequest(
                request_id=f"r{first + i}",
                prompt_token_ids=p,
                adapter_id=name,
                sampling=SamplingParams(max_new_tokens=MAX_NEW, logprobs=True, ignore_eos=True),
            )
            for i, (name, p) in enumerate(zip(names, prompts, strict=True))
        ],
    )
    for outcome in outcomes:
        assert outcome.error is None, outcome.error
    return [(outcome.token_ids, outcome.logprobs) for outcome in outcomes]


def _compare(
    base: LoadedBase, root: Path, peft: Any, adapters: dict[str, Any] | None = None, **engine: Any
) -> tuple[float, float]:
    """(fraction of rows whose greedy tokens equal PEFT's, max |log-prob difference| over matching prefixes);
    ``adapters``: settings of the adapters section."""
    engine = make_engine(base, [root], engine={"max_running": 8, **engine}, adapters=adapters or {})
    rows: list[str | None] = [*ADAPTERS, None]
    try:
        outputs = _greedy(engine, rows)
    finally:
        engine.stop()
    equal, worst = 0, 0.0
    for index, (name, (mine_tokens, mine_logprobs)) in enumerate(zip(rows, outputs, strict=True)):
        tokens, want = peft_generate(peft, name, _prompt(index), MAX_NEW, ignore_eos=True)
        equal += tokens == mine_tokens
        for step, (mine, theirs) in enumerate(zip(mine_tokens, tokens, strict=True)):
            if mine != theirs:
                break
            worst = max(worst, abs(mine_logprobs[step] - want[step]))
    return equal / len(rows), worst


def test_engine_on_cuda_float32_matches_peft(random_base: Path, tmp_path: Path) -> None:
    base = load_base(ModelSettings(base_model=str(random_base), device="cuda", quantization="none", dtype="float32"))
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        write_adapter(tmp_path / name, base.shape, seed=seed, **kwargs)
    peft = _peft(random_base, tmp_path, dtype=torch.float32, device_map={"": "cuda"})
    agreement, worst = _compare(base, tmp_path, peft)
    print(f"float32 on CUDA: token agreement {agreement:.2f}, max |dlogprob| {worst:.2e}")
    assert agreement == 1.0 and worst <= 1e-3


def test_engine_on_cuda_nf4_bf16_matches_peft(random_base: Path, tmp_path: Path) -> None:
    """bfloat16 greedy decoding on a random model meets near-ties, so the check is teacher-forced: PEFT on the same
    nf4 base scores every token the engine chose; both must agree within bfloat16 rounding, and every engine
    choice must be PEFT's argmax or within rounding of it."""
    base = load_base(ModelSettings(base_model=str(random_base), device="cuda"))
    assert base.quantization == "nf4" and base.dtype == torch.bfloat16
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        write_adapter(tmp_path / name, base.shape, seed=seed, **kwargs)
    peft = _peft(
        random_base,
        tmp_path,
        dtype=torch.bfloat16,
        device_map={"": "cuda"},
        quantization_config=quantization_config("nf4", torch.bfloat16),
    )
    engine = make_engine(base, [tmp_path], engine={"max_running": 8})
    rows: list[str | None] = [*ADAPTERS, None]
    try:
        outputs = _greedy(engine, rows)
    finally:
        engine.stop()
    differences, regrets = [], []
    for index, (name, (tokens, mine)) in enumerate(zip(rows, outputs, strict=True)):
        prompt = _prompt(index)
        logits = peft_logits(peft, name, [*prompt, *tokens])
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        for step, token in enumerate(tokens):
            differences.append(abs(mine[step] - logprobs[step, token].item()))
            regrets.append(logprobs[step].max().item() - logprobs[step, token].item())
    print(
        f"nf4/bf16 on CUDA: max |dlogprob| {max(differences):.3f}, mean {sum(differences) / len(differences):.4f}, "
        f"max regret vs PEFT argmax {max(regrets):.3f}"
    )
    assert max(differences) <= 0.15 and sum(differences) / len(differences) <= 0.03
    assert max(regrets) <= 0.15


SLEEP_CYCLES = 500_000_000  # torch.cuda._sleep: a few hundred milliseconds of a busy stream


def test_engine_on_cuda_with_adapters_churning_through_two_slots_matches_peft(
    random_base: Path, tmp_path: Path
) -> None:
    """Four adapters of three pools through two device slots: slots are rewritten (and pools reclaimed) from the
    side stream while other rows decode; greedy tokens equal PEFT's."""
    base = load_base(ModelSettings(base_model=str(random_base), device="cuda", quantization="none", dtype="float32"))
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        write_adapter(tmp_path / name, base.shape, seed=seed, **kwargs)
    peft = _peft(random_base, tmp_path, dtype=torch.float32, device_map={"": "cuda"})
    agreement, worst = _compare(base, tmp_path, peft, adapters={"device_slots": 2})
    print(f"float32 on CUDA, 2 device slots: token agreement {agreement:.2f}, max |dlogprob| {worst:.2e}")
    assert agreement == 1.0 and worst <= 1e-3


def test_engine_cuda_graph_replay_matches_eager_over_mixed_adapters_and_a_pool_reallocation(
    random_base: Path, tmp_path: Path
) -> None:
    """Graphs captured per bucket and pool set and replayed: the same greedy tokens as cuda_graphs=off for decode
    steps mixing two adapters of one pool, one of another and base rows (SGLang #28371's case); then a rank-32
    adapter's pool takes bytes cut from the first pool's free tail (its stacks reallocated), and the same rows
    again replay a graph recaptured over the new stacks, still right (a stale graph would read freed memory)."""
    base = load_base(ModelSettings(base_model=str(random_base), device="cuda", quantization="none", dtype="float32"))
    adapters: dict[str, dict[str, Any]] = {
        "qv-r8": {"rank": 8, "targets": QV, "strength": 40.0},
        "qv-r8-b": {"rank": 8, "targets": QV, "strength": 40.0},
        "all-r16": {"rank": 16, "targets": ALL_LINEAR, "strength": 20.0},
        "qv-r32": {"rank": 32, "targets": QV, "strength": 40.0},
    }
    for seed, (name, kwargs) in enumerate(adapters.items()):
        write_adapter(tmp_path / name, base.shape, seed=seed, **kwargs)
    mixed: list[str | None] = ["qv-r8", "all-r16", None, "qv-r8-b", None]
    # the small engine's 1 MiB holds 9 slots of the rank-8 q,v pool (112 KiB each on the tiny base), which takes
    # them all at creation; the rank-32 adapter's pool then needs bytes cut from its free tail (a reallocation)
    rows: list[str | None] = ["qv-r8", "qv-r8-b", None, None]
    results = {}
    for graphs in ("on", "off"):
        engine = make_engine(base, [tmp_path], engine={"max_running": 8, "cuda_graphs": graphs})
        small = make_engine(
            base,
            [tmp_path],
            engine={"max_running": 8, "cuda_graphs": graphs},
            adapters={"device_bytes": 2**20, "device_slots": 9},
        )
        try:
            got = [_greedy(engine, mixed)]
            before = small.slots.reallocations
            got += [_greedy(small, rows), _greedy(small, ["qv-r32"], first=10), _greedy(small, rows)]
            if graphs == "on":
                assert engine.graphs is not None and small.graphs is not None
                assert engine.graphs.captures > 0 and engine.graphs.steps >= MAX_NEW - 2, engine.describe_decode()
                assert small.slots.reallocations > before, "the rank-32 pool took no bytes from the rank-8 pool"
                assert small.graphs.captures >= 3 and "CUDA graphs" in describe(small)["decode_step"]
                print(engine.describe_decode(), "|", small.describe_decode())
            results[graphs] = got
        finally:
            engine.stop()
            small.stop()
    assert [tokens for tokens, _ in results["on"][3]] == [tokens for tokens, _ in results["on"][1]]
    for on, off in zip(results["on"], results["off"], strict=True):
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(on, off, strict=True):
            assert tokens == want_tokens
            assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= 1e-3


def test_engine_calibrates_the_lora_kernels_at_the_model_shapes(random_base: Path, tmp_path: Path) -> None:
    """The start-up calibration times one layer of the served base (q/k/v, o, gate/up, down at its dimensions) at
    engine.lora_calibration_rank capped by adapters.max_rank, Triton included (timed merged, as the forward pass
    runs it; the merged path itself: the ``proj-`` cases of test_triton_kernels_on_cuda_match_reference)."""
    base = load_base(ModelSettings(base_model=str(random_base), device="cuda", quantization="none", dtype="bfloat16"))
    engine = make_engine(base, [tmp_path], engine={"lora_calibration_rank": 32}, adapters={"max_rank": 16})
    try:
        calibration = engine.lora_kernels.calibration
        assert calibration is not None
        print(calibration.describe())
        assert "bfloat16" in calibration.label
        assert calibration.label.endswith(layer_shape(base.shape, 16).describe())
        assert all("triton" in row for row in calibration.timings.values())
    finally:
        engine.stop()
