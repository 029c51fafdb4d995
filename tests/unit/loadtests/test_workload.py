"""The load test's request mix: distribution specs parse or fail with the accepted forms, samples stay in range,
and Zipf popularity has the weights ``1 / (i + 1) ** s`` (s = 0: uniform)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loadtests.workload import Distribution, DistributionError, Popularity, RequestMix, adapter_ids


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("const:32", 32, 32), ("uniform:8:64", 8, 64), ("choice:16,32,128", 16, 128), ("normal:48:12", 1, 200)],
)
def test_samples_stay_in_range(spec: str, low: int, high: int) -> None:
    distribution = Distribution.parse(spec)
    rng = random.Random(0)
    values = [distribution.sample(rng) for _ in range(2000)]
    assert low <= min(values) and max(values) <= high
    if spec.startswith("uniform"):
        assert min(values) == 8 and max(values) == 64


def test_lognormal_has_its_median() -> None:
    rng = random.Random(1)
    values = sorted(Distribution.parse("lognormal:32:0.5").sample(rng) for _ in range(4001))
    assert 29 <= values[2000] <= 35


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gauss:3:4", "unknown kind 'gauss'"),
        ("uniform:9:3", "LO <= HI"),
        ("const:x", "must be numbers"),
        ("normal:3", "takes 2 parameter"),
        ("const:0", "positive"),
        ("choice:", "at least one value"),
    ],
)
def test_bad_specs_say_what_is_accepted(spec: str, message: str) -> None:
    with pytest.raises(DistributionError, match=message):
        Distribution.parse(spec)


def test_zipf_weights_and_uniform() -> None:
    zipf = Popularity(4, 1.0)
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert zipf.probabilities == pytest.approx([1 / harmonic, 1 / 2 / harmonic, 1 / 3 / harmonic, 1 / 4 / harmonic])
    assert Popularity(5, 0.0).probabilities == pytest.approx([0.2] * 5)
    rng = random.Random(2)
    counts = Counter(zipf.pick(rng) for _ in range(20000))
    assert counts[0] / 20000 == pytest.approx(zipf.probabilities[0], abs=0.02)
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0


def test_request_mix_draws_known_adapters() -> None:
    ids = adapter_ids("synthetic-", 3)
    assert ids == ["synthetic-0000", "synthetic-0001", "synthetic-0002"]
    mix = RequestMix(ids, 1.1, Distribution.parse("const:5"), Distribution.parse("uniform:2:4"))
    draws = [mix.draw(random.Random(seed)) for seed in range(50)]
    assert {d.adapter for d in draws} <= set(ids)
    assert all(len(d.prompt.split()) == 5 and 2 <= d.max_new_tokens <= 4 for d in draws)
