"""Drift: PSI and Jensen–Shannon against hand-computed values, the trainer's binning convention, and detectors that
flag a shifted live distribution (PSI > 0.25) and not an unshifted one (PSI < 0.1), from a trainer reference or
from an adapter's first requests."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pytest

from loraplex.server.lora.manifest import ReferenceStats
from loraplex.server.observability.drift import (
    FEATURES,
    AdapterDrift,
    DriftMonitor,
    Sample,
    bin_index,
    js_divergence,
    psi,
    reference_from_stats,
)
from loraplex.trainer.reference import histogram

DIM = 16


def test_psi_by_hand() -> None:
    # (0.25 − 0.5)·ln(0.25/0.5) + (0.75 − 0.5)·ln(0.75/0.5) = 0.173287 + 0.101366
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.274653, abs=1e-6)
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    # an empty reference bin counts as 1e-4: (0.5 − 1)·ln(0.5) + (0.5 − 1e-4)·ln(0.5/1e-4)
    assert psi([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.346574 + 0.4999 * math.log(5000), abs=1e-6)


def test_jensen_shannon_by_hand() -> None:
    # m = (0.375, 0.625); KL(p‖m) = 0.0465545, KL(q‖m) = 0.0510348 (bits); JS = their mean
    assert js_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.0487947, abs=1e-6)
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert js_divergence([0.1, 0.9], [0.1, 0.9]) == 0.0


def test_live_values_fall_in_the_trainers_bins() -> None:
    values = [float(v) for v in np.random.default_rng(3).normal(size=500)]
    reference = histogram(values)
    counts = [0] * len(reference.counts)
    for value in values:
        counts[bin_index(reference.edges, value)] += 1
    assert tuple(counts) == reference.counts
    assert bin_index(reference.edges, -1e9) == 0 and bin_index(reference.edges, 1e9) == len(counts) - 1


def samples(n: int, seed: int, shift: float = 0.0) -> list[Sample]:
    """Requests like a chat adapter's: prompt ~ N(60, 6), output ~ N(20, 4) tokens, mean logprob ~ N(−1, 0.3),
    embeddings ~ N(0, I); ``shift`` moves each by that many standard deviations (the embedding along every axis)."""
    rng = np.random.default_rng(seed)
    return [
        Sample(
            prompt_tokens=max(1, round(rng.normal(60 + 6 * shift, 6))),
            output_tokens=max(1, round(rng.normal(20 + 4 * shift, 4))),
            mean_logprob=float(rng.normal(-1 + 0.3 * shift, 0.3)),
            embedding=tuple(float(v) for v in rng.normal(shift, 1.0, DIM)),
        )
        for _ in range(n)
    ]


def stats_of(reference: Sequence[Sample]) -> ReferenceStats:
    embeddings = np.asarray([s.embedding for s in reference])
    centroid = embeddings.mean(axis=0)
    return ReferenceStats(
        num_examples=len(reference),
        prompt_tokens=histogram([s.prompt_tokens for s in reference]),
        output_tokens=histogram([s.output_tokens for s in reference]),
        mean_logprob=histogram([s.mean_logprob or 0.0 for s in reference]),
        embedding_centroid=tuple(float(v) for v in centroid),
        embedding_distance=histogram([float(d) for d in np.linalg.norm(embeddings - centroid, axis=1)]),
    )


def psi_scores(detector: AdapterDrift) -> dict[str, float]:
    return {s.feature: s.value for s in detector.scores("a", min_samples=100) if s.method == "psi"}


@pytest.mark.parametrize(("shift", "drifted"), [(0.0, False), (1.0, True)])
def test_a_trainer_reference_flags_a_shift_and_not_noise(shift: float, drifted: bool) -> None:
    detector = AdapterDrift(1, reference_from_stats(stats_of(samples(5000, seed=1))), window=1000, reference_size=10)
    for sample in samples(1000, seed=2, shift=shift):
        detector.observe(sample)
    scores = psi_scores(detector)
    assert set(scores) == set(FEATURES)
    if drifted:
        assert min(scores.values()) > 0.25, scores
    else:
        assert max(scores.values()) < 0.1, scores


@pytest.mark.parametrize(("shift", "drifted"), [(0.0, False), (1.0, True)])
def test_the_first_requests_are_the_reference_without_trainer_statistics(shift: float, drifted: bool) -> None:
    detector = AdapterDrift(1, None, window=600, reference_size=400)
    for sample in samples(400, seed=4):
        detector.observe(sample)
    assert detector.reference is not None and detector.scores("a", min_samples=1) == []
    for sample in samples(600, seed=5, shift=shift):
        detector.observe(sample)
    scores = psi_scores(detector)
    assert set(scores) == set(FEATURES)
    assert (min(scores.values()) > 0.25) if drifted else (max(scores.values()) < 0.1), scores


def test_the_window_slides() -> None:
    detector = AdapterDrift(1, reference_from_stats(stats_of(samples(3000, seed=1))), window=300, reference_size=10)
    for sample in samples(300, seed=6, shift=2.0):
        detector.observe(sample)
    assert min(psi_scores(detector).values()) > 0.25
    for sample in samples(300, seed=7):  # the shifted requests leave the window
        detector.observe(sample)
    assert max(psi_scores(detector).values()) < 0.1


def manifest(reference: ReferenceStats) -> dict[str, object]:
    """A parsed ``loraplex.json`` as the adapter cache holds it."""
    return {"base_fingerprint": "", "base_model": "embedded", "reference": dataclasses.asdict(reference)}


def test_the_monitor_uses_the_manifest_resets_on_a_new_version_and_waits_for_enough_samples() -> None:
    monitor = DriftMonitor(window=200, min_samples=150, reference_size=50)
    given = manifest(stats_of(samples(2000, seed=1)))
    calls: list[int] = []

    def manifest_of() -> dict[str, object]:
        calls.append(1)
        return given

    for sample in samples(149, seed=8, shift=1.0):
        monitor.observe("a", 1, manifest_of, sample)
    assert monitor.scores() == []  # below observability.drift_min_samples
    monitor.observe("a", 1, manifest_of, samples(1, seed=9, shift=1.0)[0])
    scores = monitor.scores()
    assert len(scores) == 2 * len(FEATURES) and {s.method for s in scores} == {"psi", "js"}
    assert all(s.value > 0.25 for s in scores if s.method == "psi")
    assert len(calls) == 1  # read once per version
    monitor.observe("a", 2, lambda: None, samples(1, seed=10)[0])  # version 2 without statistics: first-N again
    assert monitor.scores() == []


def test_a_broken_manifest_reference_falls_back_to_the_first_requests(caplog: pytest.LogCaptureFixture) -> None:
    monitor = DriftMonitor(window=100, min_samples=10, reference_size=20)
    for sample in samples(40, seed=11):
        monitor.observe("a", 1, lambda: {"base_fingerprint": "", "reference": {"num_examples": 3}}, sample)
    assert "ignoring the drift reference" in caplog.text
    assert {s.feature for s in monitor.scores()} == set(FEATURES)
