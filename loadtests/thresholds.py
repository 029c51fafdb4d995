"""Pass/fail limits of a headless load test, checked against Locust's statistics when the run ends.

Four limits, each off when unset: the failure ratio of all calls, p95 time to first token, p99 end-to-end latency
of generation calls, and a floor on generation throughput (requests/s). :func:`violations` is plain arithmetic on
an :class:`Observed` summary, so it is tested without Locust; :func:`observe` builds that summary from Locust's
``RequestStats``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    max_failure_ratio: float | None = None  # failed calls / calls, 0..1
    max_p95_ttft_ms: float | None = None
    max_p99_e2e_ms: float | None = None
    min_rps: float | None = None  # generation requests per second

    def is_empty(self) -> bool:
        return all(value is None for value in vars(self).values())


@dataclass(frozen=True)
class Observed:
    calls: int  # every call once (a stream counts once, not for its TTFT entry)
    failures: int
    p95_ttft_ms: float | None  # None: no stream delivered a first token
    p99_e2e_ms: float | None  # None: no generation call succeeded
    generation_requests: int
    generation_rps: float


def violations(limits: Thresholds, seen: Observed) -> list[str]:
    """One sentence per missed limit; empty when the run passes."""
    problems: list[str] = []
    if seen.generation_requests == 0:
        problems.append("no generation request was made")
    if limits.max_failure_ratio is not None:
        ratio = seen.failures / seen.calls if seen.calls else 1.0
        if ratio > limits.max_failure_ratio:
            problems.append(
                f"failure ratio {ratio:.4f} ({seen.failures}/{seen.calls}) > limit {limits.max_failure_ratio}"
            )
    if limits.max_p95_ttft_ms is not None and (seen.p95_ttft_ms is None or seen.p95_ttft_ms > limits.max_p95_ttft_ms):
        problems.append(f"p95 time to first token {_ms(seen.p95_ttft_ms)} > limit {limits.max_p95_ttft_ms:.0f} ms")
    if limits.max_p99_e2e_ms is not None and (seen.p99_e2e_ms is None or seen.p99_e2e_ms > limits.max_p99_e2e_ms):
        problems.append(f"p99 end-to-end latency {_ms(seen.p99_e2e_ms)} > limit {limits.max_p99_e2e_ms:.0f} ms")
    if limits.min_rps is not None and seen.generation_rps < limits.min_rps:
        problems.append(f"generation throughput {seen.generation_rps:.3f} requests/s < floor {limits.min_rps}")
    return problems


def _ms(value: float | None) -> str:
    return "n/a (no samples)" if value is None else f"{value:.0f} ms"


def observe(stats: Any, ttft_names: Iterable[str], e2e_names: Iterable[str]) -> Observed:
    """The summary of Locust's ``RequestStats``: entries named in ``ttft_names`` are TTFT samples (not counted as
    calls), those in ``e2e_names`` are generation calls; every other entry is a call too (admin)."""
    from locust.stats import StatsEntry

    ttft_set, e2e_set = set(ttft_names), set(e2e_names)
    ttft = StatsEntry(stats, "ttft", "")
    e2e = StatsEntry(stats, "e2e", "")
    calls = failures = 0
    for (name, _method), entry in stats.entries.items():
        if name in ttft_set:
            ttft.extend(entry)
            continue
        calls += entry.num_requests
        failures += entry.num_failures
        if name in e2e_set:
            e2e.extend(entry)
    ok_ttft = ttft.num_requests - ttft.num_failures
    ok_e2e = e2e.num_requests - e2e.num_failures
    return Observed(
        calls=calls,
        failures=failures,
        p95_ttft_ms=float(ttft.get_response_time_percentile(0.95)) if ok_ttft else None,
        p99_e2e_ms=float(e2e.get_response_time_percentile(0.99)) if ok_e2e else None,
        generation_requests=e2e.num_requests,
        generation_rps=float(e2e.total_rps) if e2e.num_requests else 0.0,
    )
