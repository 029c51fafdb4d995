"""The affinity benchmark's pure logic: the ABBA order of the policies, what each is compared with, and the two
popularities of its trace."""

from __future__ import annotations

from collections import Counter

from loadtests.bench_affinity import Workload, baseline, schedule, trace


def test_rounds_alternate_abba_so_each_policy_gets_early_and_late_rounds() -> None:
    assert schedule(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]
    assert schedule(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]


def test_each_policy_is_compared_with_the_round_robin_of_its_own_proxy_where_that_ran() -> None:
    ran = ["haproxy-bounded-affinity@150", "haproxy-round-robin", "vllm-router-consistent-hash"]
    assert [baseline(policy, ran) for policy in ran] == ["haproxy-round-robin", None, "haproxy-round-robin"]
    ran.append("vllm-router-round-robin")
    assert baseline("vllm-router-consistent-hash", ran) == "vllm-router-round-robin"
    assert baseline("vllm-router-round-robin", ran) == "haproxy-round-robin"
    assert baseline("haproxy-bounded-affinity", ["haproxy-bounded-affinity", "vllm-router-round-robin"]) is None


def test_the_trace_repeats_per_popularity_and_zipf_is_skewed_where_uniform_is_not() -> None:
    load = Workload(adapters=8, requests=4000)
    zipf, uniform = trace(load, "zipf"), trace(load, "uniform")
    assert zipf == trace(load, "zipf") and zipf != uniform  # every round and policy replays the same requests
    zipf_counts = Counter(index for index, _ in zipf)
    uniform_counts = Counter(index for index, _ in uniform)
    assert zipf_counts[0] > 3 * zipf_counts[7]  # 1/1 against 1/8
    assert max(uniform_counts.values()) < 1.3 * min(uniform_counts.values())
