"""The A/B statistics math, in one module: confidence intervals, tests against the control, the sample-ratio check,
percentiles, and the normal / Student t / chi-square distributions they need (no SciPy).

- positive rate: Wilson score interval; two-proportion z-test (pooled standard error), two-sided;
- mean score: Student t interval; Welch's t-test (Welch–Satterthwaite degrees of freedom), two-sided;
- sample-ratio mismatch: Pearson's chi-square goodness of fit of the assigned counts to the weights;
- latency: percentiles with linear interpolation between order statistics (NumPy's default).

The distributions use the regularized incomplete beta (continued fraction) and gamma (series / continued fraction)
functions, accurate to about 1e-12 relative, far beyond what a p-value needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
SRM_ALPHA = 0.001  # a sample-ratio p-value below this flags a mismatch
_EPS = 1e-15
_MAX_ITERATIONS = 500


# ------------------------------------------------------------------------------------------------- distributions


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2))


def normal_quantile(p: float) -> float:
    """The z with P(Z <= z) = p, by bisection on the CDF (p in (0, 1))."""
    return _bisect(lambda z: 0.5 * math.erfc(-z / math.sqrt(2)) - p, -40.0, 40.0)


def _guard(value: float) -> float:
    """Keeps a Lentz denominator away from zero."""
    return value if abs(value) > 1e-300 else 1e-300


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - regularized_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    c = 1.0
    d = 1.0 / _guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, _MAX_ITERATIONS):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        delta = 1.0
        for numerator in (even, odd):
            d = 1.0 / _guard(1.0 + numerator * d)
            c = _guard(1.0 + numerator / c)
            delta = c * d
            result *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(log_front) * result / a


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (p in (0.5, 1)), by bisection."""
    return _bisect(lambda t: 1.0 - student_t_two_sided_p(t, df) / 2.0 - p, 0.0, 1e6)


def regularized_gamma_upper(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a), the regularized upper incomplete gamma function."""
    if x <= 0.0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:  # the series for P(a, x) converges fast here
        term = total = 1.0 / a
        n = a
        for _ in range(_MAX_ITERATIONS):
            n += 1.0
            term *= x / n
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return 1.0 - total * math.exp(log_front)
    # Continued fraction for Q(a, x) (modified Lentz).
    b = x + 1.0 - a
    c, d = 1e300, 1.0 / b
    result = d
    for i in range(1, _MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = 1.0 / _guard(an * d + b)
        c = _guard(b + an / c)
        delta = c * d
        result *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(log_front) * result


def chi_square_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for a chi-square X with ``df`` degrees of freedom."""
    return regularized_gamma_upper(df / 2.0, statistic / 2.0)


def _bisect(f: Callable[[float], float], low: float, high: float) -> float:
    for _ in range(200):
        middle = (low + high) / 2.0
        if f(middle) < 0:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return (low + high) / 2.0


# ------------------------------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """A variant against the control: ``difference`` = variant − control, the test statistic and its p-value."""

    difference: float
    statistic: float
    p_value: float


@dataclass(frozen=True)
class SampleRatio:
    chi_square: float
    degrees_of_freedom: int
    p_value: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < SRM_ALPHA


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of numbers (Welford's update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    @property
    def variance(self) -> float:
        """The sample variance (n − 1 in the denominator); 0 below two values."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


def _z(level: float) -> float:
    return normal_quantile(0.5 + level / 2.0)


def wilson_interval(successes: int, n: int, level: float = CONFIDENCE) -> Interval | None:
    """The Wilson score interval of a proportion; None without trials."""
    if n <= 0:
        return None
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(moments: Moments, level: float = CONFIDENCE) -> Interval | None:
    """The Student t interval of a mean; None below two values."""
    if moments.n < 2:
        return None
    half = student_t_quantile(0.5 + level / 2.0, moments.n - 1) * math.sqrt(moments.variance / moments.n)
    return Interval(moments.mean - half, moments.mean + half)


def two_proportion_z_test(control: tuple[int, int], variant: tuple[int, int]) -> Comparison | None:
    """Pooled two-proportion z-test of (successes, trials) pairs; None when it is undefined."""
    (s_a, n_a), (s_b, n_b) = control, variant
    if n_a <= 0 or n_b <= 0:
        return None
    pooled = (s_a + s_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return None
    difference = s_b / n_b - s_a / n_a
    z = difference / se
    return Comparison(difference, z, normal_two_sided_p(z))


def welch_t_test(control: Moments, variant: Moments) -> Comparison | None:
    """Welch's unequal-variance t-test of two means; None below two values a side or with no variance at all."""
    if control.n < 2 or variant.n < 2:
        return None
    va, vb = control.variance / control.n, variant.variance / variant.n
    if va + vb == 0:
        return None
    difference = variant.mean - control.mean
    t = difference / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (control.n - 1) + vb * vb / (variant.n - 1))
    return Comparison(difference, t, student_t_two_sided_p(t, df))


def sample_ratio_test(observed: Sequence[int], weights: Sequence[float]) -> SampleRatio | None:
    """Chi-square goodness of fit of ``observed`` counts to shares proportional to ``weights``.

    Cells with zero weight are left out (they can receive no traffic); None without traffic or with fewer than two
    weighted cells.
    """
    total_weight = sum(weights)
    cells = [(o, w / total_weight) for o, w in zip(observed, weights, strict=True) if w > 0]
    total = sum(o for o, _ in cells)
    if total == 0 or len(cells) < 2:
        return None
    statistic = sum((o - total * share) ** 2 / (total * share) for o, share in cells)
    df = len(cells) - 1
    return SampleRatio(statistic, df, chi_square_sf(statistic, df))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
