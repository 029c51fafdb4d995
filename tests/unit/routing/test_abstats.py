"""The A/B statistics against values worked out by hand (each case shows its arithmetic) and published tables."""

from __future__ import annotations

import math

import pytest

from loraplex.server.routing import abstats
from loraplex.server.routing.abstats import Moments


def moments(values: list[float]) -> Moments:
    m = Moments()
    for value in values:
        m.add(value)
    return m


@pytest.mark.parametrize(
    ("statistic", "df", "p"),
    [
        (3.841458820694124, 1, 0.05),  # the 95 % critical value of chi-square(1)
        (10.827566170662733, 1, 0.001),  # the SRM threshold for two variants
        (8.0, 2, math.exp(-4.0)),  # chi-square(2) survival is exp(-x/2)
        (0.5, 4, math.exp(-0.25) * 1.25),  # chi-square(4): exp(-x/2)(1 + x/2)
        (0.0, 3, 1.0),
    ],
)
def test_chi_square_survival(statistic: float, df: int, p: float) -> None:
    assert abstats.chi_square_sf(statistic, df) == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (2.2281388519649385, 10, 0.05),  # the table's 97.5 % point of t(10)
        (12.706204736174703, 1, 0.05),
        (1.0, 1, 0.5),  # Cauchy: P(|T| > 1) = 1/2
        (0.0, 7, 1.0),
    ],
)
def test_student_t_two_sided(t: float, df: float, p: float) -> None:
    assert abstats.student_t_two_sided_p(t, df) == pytest.approx(p, rel=1e-8)


def test_quantiles_invert_the_distributions() -> None:
    assert abstats.normal_quantile(0.975) == pytest.approx(1.959963984540054, rel=1e-9)
    assert abstats.student_t_quantile(0.975, 4) == pytest.approx(2.7764451051977934, rel=1e-8)
    assert abstats.normal_two_sided_p(1.959963984540054) == pytest.approx(0.05, rel=1e-9)


def test_regularized_beta_matches_the_binomial_sum() -> None:
    # I_0.4(2, 3) = P(Binomial(4, 0.4) >= 2) = 6·.4²·.6² + 4·.4³·.6 + .4⁴ = .3456 + .1536 + .0256
    assert abstats.regularized_beta(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)


def test_wilson_interval_of_8_in_10() -> None:
    # z² = 3.8415; centre = (0.8 + z²/20) / (1 + z²/10) = 0.71674; half = z/(1.38415)·√(0.016 + z²/400) = 0.22658
    interval = abstats.wilson_interval(8, 10)
    assert interval is not None
    assert (interval.low, interval.high) == (pytest.approx(0.490162, abs=1e-6), pytest.approx(0.943318, abs=1e-6))
    assert abstats.wilson_interval(0, 0) is None


def test_mean_interval_uses_student_t() -> None:
    # 1..5: mean 3, s² = 2.5, s/√5 = 0.70711, t(0.975, 4) = 2.77645 → 3 ± 1.96324
    interval = abstats.mean_interval(moments([1, 2, 3, 4, 5]))
    assert interval is not None
    assert (interval.low, interval.high) == (pytest.approx(1.036757, abs=1e-6), pytest.approx(4.963243, abs=1e-6))
    assert abstats.mean_interval(moments([7.0])) is None


def test_moments_are_welford_exact() -> None:
    m = moments([2, 4, 4, 4, 5, 5, 7, 9])
    assert (m.n, m.mean, m.variance) == (8, 5.0, pytest.approx(32 / 7))


def test_two_proportion_z_test() -> None:
    # 40/100 vs 55/100: pooled 0.475, se = √(0.475·0.525·0.02) = 0.070622, z = 0.15/se = 2.12398, p = 0.033672
    result = abstats.two_proportion_z_test((40, 100), (55, 100))
    assert result is not None
    assert result.difference == pytest.approx(0.15)
    assert result.statistic == pytest.approx(2.123977, abs=1e-6)
    assert result.p_value == pytest.approx(0.0336721, abs=1e-7)
    assert abstats.two_proportion_z_test((0, 10), (0, 10)) is None  # no variance: undefined
    assert abstats.two_proportion_z_test((1, 0), (1, 10)) is None


def test_welch_t_test() -> None:
    # control 1..5 (mean 3, s² 2.5), variant 2,4,..,10 (mean 6, s² 10): se = √(0.5 + 2) = 1.58114, t = 1.89737,
    # df = 2.5² / (0.5²/4 + 2²/4) = 5.88235, two-sided p = 0.107531
    result = abstats.welch_t_test(moments([1, 2, 3, 4, 5]), moments([2, 4, 6, 8, 10]))
    assert result is not None
    assert (result.difference, result.statistic) == (3.0, pytest.approx(1.8973666, abs=1e-7))
    assert result.p_value == pytest.approx(0.1075312, abs=1e-7)
    assert abstats.welch_t_test(moments([1, 1]), moments([1, 1])) is None
    assert abstats.welch_t_test(moments([1]), moments([1, 2, 3])) is None


@pytest.mark.parametrize(
    ("observed", "weights", "chi_square", "p", "mismatch"),
    [
        ([520, 480], [50, 50], 1.6, 0.2059032107, False),  # (20²/500)·2
        ([600, 400], [50, 50], 40.0, 2.5396285895e-10, True),
        ([5000, 2600, 2400], [50, 25, 25], 8.0, math.exp(-4.0), False),  # 0 + 100²/2500 + 100²/2500
        ([700, 300, 0], [70, 30, 0], 0.0, 1.0, False),  # a zero-weight variant is no cell
    ],
)
def test_sample_ratio_test(
    observed: list[int], weights: list[float], chi_square: float, p: float, mismatch: bool
) -> None:
    result = abstats.sample_ratio_test(observed, weights)
    assert result is not None
    assert result.chi_square == pytest.approx(chi_square)
    assert result.p_value == pytest.approx(p, rel=1e-8)
    assert result.mismatch is mismatch


def test_sample_ratio_test_needs_traffic_and_two_cells() -> None:
    assert abstats.sample_ratio_test([0, 0], [50, 50]) is None
    assert abstats.sample_ratio_test([10], [100]) is None


def test_percentiles_interpolate_linearly() -> None:
    assert abstats.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert abstats.percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)  # position 2.85
    assert abstats.percentile([], 50) is None
