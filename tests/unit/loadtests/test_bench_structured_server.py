"""The server-side structured-output benchmark's pure logic: the palindromic block order and the table of each
mode with its ratios to the free baseline."""

from __future__ import annotations

from loadtests.bench_server import Sample
from loadtests.bench_structured_server import MODES, Mode, palindrome, report


def test_blocks_run_forward_then_backward_so_every_mode_sits_as_early_as_late() -> None:
    order = palindrome(3, 2)
    assert order == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert {mode: sum(i for i, m in enumerate(order) if m == mode) for mode in range(3)} == {0: 22, 1: 22, 2: 22}


def test_the_modes_are_free_first_then_one_constraint_each() -> None:
    assert list(MODES) == ["free", "json_schema", "regex"]
    assert MODES["free"] == {} and all(len(MODES[name]) == 1 for name in ("json_schema", "regex"))


def test_the_report_gives_each_modes_rate_step_time_and_the_ratio_to_free() -> None:
    # 4 tokens: TTFT 0.1 s, engine 0.4 s -> 0.1 s per later token.
    free = Mode("free", [Sample(tokens=4, prompt_tokens=25, ttft=0.1, engine=0.4)] * 2, seconds=1.0)
    json_mode = Mode("json_schema", [Sample(tokens=4, prompt_tokens=25, ttft=0.1, engine=0.7)] * 2, seconds=2.0)
    json_mode.samples.append(Sample(tokens=3, prompt_tokens=25, ttft=0.1, engine=0.5))  # stopped early
    json_mode.failures.append("RuntimeError: boom")
    lines = report([free, json_mode], new_tokens=4).splitlines()
    assert lines[2] == "| free | 2 | 0 | 0 | 8.0 | 100.0 | 100 |"
    assert lines[3] == "| json_schema | 4 | 1 | 1 | 5.5 | 200.0 | 100 |"
    assert lines[4] == "| json_schema ÷ free | | | | 0.688 | 2.000 | 1.000 |"
