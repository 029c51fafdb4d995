"""Drift detection per adapter: a sliding window of live requests against a reference distribution.

Features of each request: prompt tokens, output tokens, mean token log-probability of the output, and the
Euclidean distance of its prompt embedding (mean-pooled final hidden state) from the reference centroid. The
reference is the trainer's :class:`~loraplex.server.lora.manifest.ReferenceStats` from the adapter's
``loraplex.json`` (its histogram edges bin live values), or, without one, the adapter's first N requests (bins at
their deciles, centroid = their mean embedding). Scores per feature:

- PSI, population stability index: ``Σ (a − e) · ln(a / e)`` over bins (empty bins count as 1e-4);
  by convention < 0.1 stable, 0.1–0.25 moderate, > 0.25 drift;
- JS, Jensen–Shannon divergence with base-2 logarithms: 0 (same) to 1 (disjoint).

Values below the first or above the last edge count in the end bins, as in the trainer's histograms.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraplex.server.lora.manifest import AdapterManifest, Histogram, ReferenceStats

log = logging.getLogger(__name__)

FEATURES = ("prompt_tokens", "output_tokens", "mean_logprob", "embedding_distance")
PSI_EMPTY_BIN = 1e-4  # proportion an empty bin counts as in PSI (the log of zero is undefined)
REFERENCE_BINS = 10


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of ``actual`` against ``expected`` (proportions over the same bins)."""
    total = 0.0
    for e_raw, a_raw in zip(expected, actual, strict=True):
        e, a = max(e_raw, PSI_EMPTY_BIN), max(a_raw, PSI_EMPTY_BIN)
        total += (a - e) * math.log(a / e)
    return total


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) of two distributions over the same bins."""

    def kl(x: Sequence[float], m: Sequence[float]) -> float:
        return sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m, strict=True) if xi > 0)

    middle = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return max(0.0, 0.5 * kl(p, middle) + 0.5 * kl(q, middle))


def bin_index(edges: Sequence[float], value: float) -> int:
    """The bin of ``value``: ``[edges[i], edges[i+1])``, with outliers in the end bins."""
    return bisect_right(edges, value, 1, len(edges) - 1) - 1


def proportions(counts: Sequence[int]) -> tuple[float, ...]:
    total = sum(counts)
    return tuple(c / total for c in counts) if total else tuple(0.0 for _ in counts)


@dataclass(frozen=True)
class Sample:
    """What drift needs from one finished request."""

    prompt_tokens: int
    output_tokens: int
    mean_logprob: float | None
    embedding: Sequence[float] | None


@dataclass(frozen=True)
class DriftScore:
    adapter: str
    feature: str
    method: str  # psi | js
    value: float


@dataclass(frozen=True)
class Reference:
    edges: Mapping[str, tuple[float, ...]]  # feature -> bin edges
    expected: Mapping[str, tuple[float, ...]]  # feature -> reference proportions per bin
    centroid: np.ndarray | None  # reference embedding centroid (float64)


def _values(sample: Sample, centroid: np.ndarray | None) -> dict[str, float]:
    values: dict[str, float] = {
        "prompt_tokens": float(sample.prompt_tokens),
        "output_tokens": float(sample.output_tokens),
    }
    if sample.mean_logprob is not None and math.isfinite(sample.mean_logprob):
        values["mean_logprob"] = sample.mean_logprob
    if sample.embedding is not None and centroid is not None and len(sample.embedding) == len(centroid):
        values["embedding_distance"] = float(np.linalg.norm(np.asarray(sample.embedding, dtype=np.float64) - centroid))
    return values


def reference_from_stats(stats: ReferenceStats) -> Reference:
    """The reference of a trainer manifest: its histograms as they are."""
    histograms: dict[str, Histogram] = {
        "prompt_tokens": stats.prompt_tokens,
        "output_tokens": stats.output_tokens,
        "mean_logprob": stats.mean_logprob,
        "embedding_distance": stats.embedding_distance,
    }
    return Reference(
        edges={name: h.edges for name, h in histograms.items()},
        expected={name: proportions(h.counts) for name, h in histograms.items()},
        centroid=np.asarray(stats.embedding_centroid, dtype=np.float64),
    )


def _decile_edges(values: Sequence[float]) -> tuple[float, ...]:
    """Bin edges at the deciles of ``values`` (fewer when they repeat; one bin around a single value)."""
    edges = tuple(sorted(set(np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, REFERENCE_BINS + 1)))))
    return edges if len(edges) >= 2 else (edges[0] - 0.5, edges[0] + 0.5)


def reference_from_samples(samples: Sequence[Sample]) -> Reference:
    """The reference of an adapter without trainer statistics: its first requests."""
    embeddings = [s.embedding for s in samples if s.embedding is not None]
    centroid = np.mean(np.asarray(embeddings, dtype=np.float64), axis=0) if embeddings else None
    columns: dict[str, list[float]] = {}
    for sample in samples:
        for name, value in _values(sample, centroid).items():
            columns.setdefault(name, []).append(value)
    edges: dict[str, tuple[float, ...]] = {}
    expected: dict[str, tuple[float, ...]] = {}
    for name, values in columns.items():
        edges[name] = _decile_edges(values)
        counts = [0] * (len(edges[name]) - 1)
        for value in values:
            counts[bin_index(edges[name], value)] += 1
        expected[name] = proportions(counts)
    return Reference(edges, expected, centroid)


class _Window:
    """The bins of the latest ``size`` values of one feature, with counts kept up to date in O(1)."""

    def __init__(self, bins: int, size: int) -> None:
        self.counts = [0] * bins
        self._bins: deque[int] = deque(maxlen=size)

    def add(self, index: int) -> None:
        if len(self._bins) == self._bins.maxlen:
            self.counts[self._bins[0]] -= 1
        self._bins.append(index)
        self.counts[index] += 1

    def __len__(self) -> int:
        return len(self._bins)


class AdapterDrift:
    """One adapter version's reference (given, or being collected from its first requests) and live windows."""

    def __init__(self, version: int, reference: Reference | None, window: int, reference_size: int) -> None:
        self.version = version
        self.reference = reference
        self._window = window
        self._reference_size = reference_size
        self._pending: list[Sample] = []
        self._windows: dict[str, _Window] = {}
        if reference is not None:
            self._open_windows(reference)

    def _open_windows(self, reference: Reference) -> None:
        self._windows = {name: _Window(len(edges) - 1, self._window) for name, edges in reference.edges.items()}

    def observe(self, sample: Sample) -> None:
        if self.reference is None:
            self._pending.append(sample)
            if len(self._pending) >= self._reference_size:
                self.reference = reference_from_samples(self._pending)
                self._pending = []
                self._open_windows(self.reference)
            return
        for name, value in _values(sample, self.reference.centroid).items():
            window = self._windows.get(name)
            if window is not None:
                window.add(bin_index(self.reference.edges[name], value))

    def scores(self, adapter: str, min_samples: int) -> list[DriftScore]:
        if self.reference is None:
            return []
        found: list[DriftScore] = []
        for name in FEATURES:
            window = self._windows.get(name)
            if window is None or len(window) < min_samples:
                continue
            expected, actual = self.reference.expected[name], proportions(window.counts)
            found.append(DriftScore(adapter, name, "psi", psi(expected, actual)))
            found.append(DriftScore(adapter, name, "js", js_divergence(expected, actual)))
        return found


def reference_of_manifest(manifest: Mapping[str, Any] | None) -> Reference | None:
    """The trainer's reference in a parsed ``loraplex.json``; None when it has none or it cannot be read."""
    if not manifest or not manifest.get("reference"):
        return None
    try:
        stats = AdapterManifest.from_dict(dict(manifest)).reference
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the drift reference of an adapter manifest: %s", exc)
        return None
    return None if stats is None else reference_from_stats(stats)


class DriftMonitor:
    """Detectors per adapter label; observed on the event loop, scored from the metrics thread."""

    def __init__(self, window: int, min_samples: int, reference_size: int) -> None:
        self._window = window
        self._min_samples = min_samples
        self._reference_size = reference_size
        self._detectors: dict[str, AdapterDrift] = {}
        self._lock = threading.Lock()

    def observe(
        self, adapter: str, version: int, manifest: Callable[[], Mapping[str, Any] | None], sample: Sample
    ) -> None:
        """Adds ``sample`` of ``adapter`` at ``version``; a new version starts over with its own reference."""
        with self._lock:
            detector = self._detectors.get(adapter)
            if detector is None or detector.version != version:
                reference = reference_of_manifest(manifest())
                detector = AdapterDrift(version, reference, self._window, self._reference_size)
                self._detectors[adapter] = detector
            detector.observe(sample)

    def scores(self) -> list[DriftScore]:
        with self._lock:
            return [s for name, d in sorted(self._detectors.items()) for s in d.scores(name, self._min_samples)]
