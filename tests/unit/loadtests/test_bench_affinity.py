"""The affinity benchmark's pure logic: the ABBA order of the policies and the two popularities of its trace."""

from __future__ import annotations

from collections import Counter

from loadtests.bench_affinity import Workload, schedule, trace
from tests.support.deploy.haproxy import Balance


def test_rounds_alternate_abba_so_each_policy_gets_early_and_late_rounds() -> None:
    a, b = Balance.AFFINITY, Balance.ROUND_ROBIN
    assert schedule(6) == [a, b, b, a, a, b]


def test_the_trace_repeats_per_popularity_and_zipf_is_skewed_where_uniform_is_not() -> None:
    load = Workload(adapters=8, requests=4000)
    zipf, uniform = trace(load, "zipf"), trace(load, "uniform")
    assert zipf == trace(load, "zipf") and zipf != uniform  # every round and policy replays the same requests
    zipf_counts = Counter(index for index, _ in zipf)
    uniform_counts = Counter(index for index, _ in uniform)
    assert zipf_counts[0] > 3 * zipf_counts[7]  # 1/1 against 1/8
    assert max(uniform_counts.values()) < 1.3 * min(uniform_counts.values())
