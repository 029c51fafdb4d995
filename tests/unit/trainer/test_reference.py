"""Reference histograms: valid for the manifest schema and holding every value."""

from __future__ import annotations

import pytest

from loraplex.trainer.reference import histogram


@pytest.mark.parametrize("values", [[5.0] * 10, list(range(100)), [1, 1, 1, 2, 50], [-2.5, -0.1, -0.7]])
def test_histogram_counts_every_value(values: list[float]) -> None:
    hist = histogram(values)
    assert sum(hist.counts) == len(values)
    assert hist.edges[0] <= min(values) and hist.edges[-1] >= max(values)
    for value in values:
        index = sum(1 for edge in hist.edges[1:-1] if value >= edge)
        assert hist.edges[index] <= value <= hist.edges[index + 1]


def test_quantile_bins_spread_the_mass() -> None:
    hist = histogram([float(v) for v in range(1000)], bins=10)
    assert len(hist.counts) == 10
    assert max(hist.counts) - min(hist.counts) <= 2
