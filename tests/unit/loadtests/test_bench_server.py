"""The server benchmark's pure logic: the adapter sets, which request uses which adapter, the per-phase arithmetic
and the headline ratio, the prompt fitted to an exact token count, the server flags and the command line."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from loadtests.bench_server import (
    PHASES,
    SETS,
    PhaseResult,
    Sample,
    SetResult,
    Workload,
    fit_prompt,
    mixed_over_base,
    options,
    parse_args,
    parse_sets,
    phase_adapters,
    server_flags,
    set_ids,
    summary_table,
)
from loadtests.workload import WORDS

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_the_two_adapter_sets() -> None:
    from loadtests.bench_engine import SHAPES

    assert SETS == ("light", "heavy")
    assert SHAPES["light"]["rank"] == 8 and list(SHAPES["light"]["targets"]) == ["q_proj", "v_proj"]
    assert SHAPES["heavy"]["rank"] == 16 and sorted(SHAPES["heavy"]["targets"]) == sorted(ALL_LINEAR)
    ids = set_ids("light")
    assert len(ids) == 32 and ids[0] == "light-0000" and ids[-1] == "light-0031"
    assert set_ids("heavy", 2) == ["heavy-0000", "heavy-0001"]


def test_mixed_phase_request_i_uses_adapter_i_mod_32() -> None:
    ids = set_ids("light")
    chosen = phase_adapters("mixed", 64, ids)
    assert len(chosen) == 64
    assert chosen[0] == "light-0000" and chosen[31] == "light-0031" and chosen[32] == "light-0000"
    assert chosen[45] == "light-0013"
    assert all(chosen[i] == ids[i % 32] for i in range(64))
    assert len(set(chosen)) == 32


@pytest.mark.parametrize("phase", ["base1", "base2"])
def test_base_phases_use_no_adapter(phase: str) -> None:
    assert phase_adapters(phase, 5, set_ids("light")) == [None] * 5


def test_an_unknown_phase_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown phase 'warm'"):
        phase_adapters("warm", 4, ["a"])


def test_phase_result_arithmetic() -> None:
    samples = [Sample(32, 25, 0.2, 3.3), Sample(32, 25, 0.4, 3.5), Sample(30, 25, 0.3, 3.2)]
    result = PhaseResult.of("mixed", samples, failures=1, seconds=4.0)
    assert result.requests == 4 and result.failures == 1
    assert result.tokens == 94
    assert result.tokens_per_s == pytest.approx(23.5)
    assert result.ttft_p50_ms == pytest.approx(300.0)
    # inter-token: (3.3 - 0.2) / 31 = 0.1, (3.5 - 0.4) / 31 = 0.1, (3.2 - 0.3) / 29 = 0.1
    assert result.itl_p50_ms == pytest.approx(100.0)
    assert result.prompt_tokens == [25]


def test_inter_token_latency_needs_two_tokens() -> None:
    assert Sample(1, 25, 0.5, 0.5).inter_token is None
    assert Sample(3, 25, 0.5, 1.5).inter_token == pytest.approx(0.5)
    result = PhaseResult.of("base1", [Sample(1, 25, 0.5, 0.5)], failures=0, seconds=1.0)
    assert result.itl_p50_ms is None and result.ttft_p50_ms == pytest.approx(500.0)


def test_a_phase_without_samples() -> None:
    result = PhaseResult.of("base1", [], failures=3, seconds=2.0)
    assert (result.requests, result.tokens, result.tokens_per_s) == (3, 0, 0.0)
    assert result.ttft_p50_ms is None and result.itl_p50_ms is None and result.prompt_tokens == []


def test_mixed_over_the_mean_of_both_base_phases() -> None:
    assert mixed_over_base(100.0, 90.0, 80.0) == pytest.approx(1.0)
    assert mixed_over_base(200.0, 75.0, 100.0) == pytest.approx(0.5)


def _phase(phase: str, tokens_per_s: float) -> PhaseResult:
    return PhaseResult(phase, 64, 0, 2048, 2048 / tokens_per_s, tokens_per_s, 100.0, 10.0, [25])


def test_set_result_ratio_json_and_table() -> None:
    rates = {"base1": 120.0, "mixed": 99.0, "base2": 100.0}
    result = SetResult("light", 8, ["q_proj", "v_proj"], 32, {p: _phase(p, rates[p]) for p in PHASES})
    assert result.ratio == pytest.approx(0.9)
    row = result.to_json()
    assert row["mixed_over_base"] == pytest.approx(0.9)
    assert row["phases"]["mixed"]["tokens_per_s"] == 99.0 and row["adapters_on_device"] == 32
    table = summary_table([result]).splitlines()
    assert "mixed ÷ mean(base1, base2)" in table[1]
    assert table[2].split() == ["light", "120.0", "99.0", "100.0", "0.90"]


def test_prompt_fitted_to_an_exact_token_count() -> None:
    async def one_token_per_word_and_bos(text: str) -> int:
        return len(text.split()) + 1

    prompt = asyncio.run(fit_prompt(one_token_per_word_and_bos, 25))
    assert len(prompt.split()) == 24 and all(word in WORDS for word in prompt.split())
    assert asyncio.run(fit_prompt(one_token_per_word_and_bos, 25)) == prompt  # deterministic


def test_prompt_overshoot_starts_again_with_other_words() -> None:
    seen: list[str] = []

    async def count(text: str) -> int:  # "insect" (the first word of seed 0) costs 3 tokens, the others 1
        seen.append(text)
        return sum(3 if word == "insect" else 1 for word in text.split())

    prompt = asyncio.run(fit_prompt(count, 2))
    assert seen[0] == "insect"  # 3 > 2: the first attempt is dropped
    assert prompt.split()[0] == "silver" and len(prompt.split()) == 2 and "insect" not in prompt

    async def always_two(text: str) -> int:
        return 2 * len(text.split())

    with pytest.raises(ValueError, match="no prompt of exactly 3 tokens in 5 tries"):
        asyncio.run(fit_prompt(always_two, 3, tries=5))


def test_request_options_greedy_with_exact_length() -> None:
    assert options(None, 32) == {"max_new_tokens": 32, "temperature": 0.0, "ignore_eos": True, "timeout": 1800.0}
    assert options("light-0003", 8)["adapter"] == "light-0003"
    assert "adapter" not in options(None, 8)


def test_server_flags_make_room_and_pass_extra_args_last() -> None:
    flags = server_flags(Workload(), ["--model.threads=1"])
    assert flags == [
        "--adapters.device-slots=33",
        "--engine.max-running=32",
        "--engine.max-queue=4096",
        "--model.threads=1",
    ]
    assert server_flags(Workload(in_flight=48))[1] == "--engine.max-running=48"


def test_default_arguments() -> None:
    args, workload = parse_args([])
    assert workload == Workload(requests=64, in_flight=32, new_tokens=32, prompt_tokens=25, adapters=32)
    assert args.sets == ["light", "heavy"] and args.target is None and args.json is None and args.server_arg == []


def test_quick_and_overrides() -> None:
    _, quick = parse_args(["--quick", "--sets", "light"])
    assert quick.requests == 32
    args, workload = parse_args(
        ["--sets=heavy", "--requests=10", "--in-flight=4", "--new-tokens=8", "--prompt-tokens=12", "--json=out.json"]
    )
    assert workload == Workload(requests=10, in_flight=4, new_tokens=8, prompt_tokens=12)
    assert args.sets == ["heavy"] and str(args.json) == "out.json"
    args, _ = parse_args(["--server-arg=--model.threads=1", "--server-arg=--engine.lora-kernel=gather"])
    assert args.server_arg == ["--model.threads=1", "--engine.lora-kernel=gather"]
    args, _ = parse_args(["--target", "127.0.0.1:50051"])
    assert args.target == "127.0.0.1:50051"


def test_parse_sets() -> None:
    assert parse_sets("heavy, light") == ["heavy", "light"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown sets"):
        parse_sets("light,medium")


@pytest.mark.parametrize(
    "argv",
    [["--sets=medium"], ["--requests=0"], ["--in-flight=0"], ["--target=h:1", "--server-arg=--model.threads=1"]],
)
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv)
    assert raised.value.code == 2
