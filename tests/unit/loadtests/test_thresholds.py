"""Pass/fail limits of a headless load test: each missed limit gives one sentence, an unset limit never fails."""

from __future__ import annotations

import pytest

from loadtests.thresholds import Observed, Thresholds, violations

SEEN = Observed(
    calls=200, failures=3, p95_ttft_ms=800.0, p99_e2e_ms=4000.0, generation_requests=150, generation_rps=2.5
)


def test_no_limits_no_violations() -> None:
    assert Thresholds().is_empty()
    assert violations(Thresholds(), SEEN) == []


def test_limits_met() -> None:
    assert violations(Thresholds(0.02, 1000, 5000, 2.0), SEEN) == []


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (Thresholds(max_failure_ratio=0.01), "failure ratio 0.0150 (3/200) > limit 0.01"),
        (Thresholds(max_p95_ttft_ms=500), "p95 time to first token 800 ms > limit 500 ms"),
        (Thresholds(max_p99_e2e_ms=3000), "p99 end-to-end latency 4000 ms > limit 3000 ms"),
        (Thresholds(min_rps=3.0), "generation throughput 2.500 requests/s < floor 3.0"),
    ],
)
def test_each_missed_limit_is_reported(limits: Thresholds, expected: str) -> None:
    assert violations(limits, SEEN) == [expected]


def test_no_samples_fail_latency_limits_and_no_traffic_fails() -> None:
    empty = Observed(calls=0, failures=0, p95_ttft_ms=None, p99_e2e_ms=None, generation_requests=0, generation_rps=0)
    problems = violations(Thresholds(max_failure_ratio=0.5, max_p95_ttft_ms=1e9), empty)
    assert problems == [
        "no generation request was made",
        "failure ratio 1.0000 (0/0) > limit 0.5",
        "p95 time to first token n/a (no samples) > limit 1000000000 ms",
    ]
