"""The ``loraplex.json`` manifest the trainer writes beside a PEFT adapter, and the server reads.

It records the base model fingerprint (the server refuses an adapter trained for another base), the training
config, a dataset hash, eval metrics, and reference statistics of the validation set for drift monitoring. The
reference embedding is the mean over prompt tokens of the final-norm hidden state *with the adapter applied*
(float32), exactly what the engine pools during prefill.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Histogram:
    """Counts of values in ``[edges[i], edges[i+1])``; values below/above the outer edges count in the end bins."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1 or len(self.counts) < 1:
            raise ValueError("a histogram needs len(edges) == len(counts) + 1 >= 2")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("histogram edges must increase strictly")


@dataclass(frozen=True)
class ReferenceStats:
    num_examples: int
    prompt_tokens: Histogram
    output_tokens: Histogram
    mean_logprob: Histogram  # per-example mean token log-probability of the reference output
    embedding_centroid: tuple[float, ...]
    embedding_distance: Histogram  # Euclidean distance of each example's prompt embedding from the centroid


@dataclass(frozen=True)
class AdapterManifest:
    base_fingerprint: str
    base_model: str
    training: dict[str, Any] = field(default_factory=dict)
    dataset_hash: str = ""
    eval: dict[str, Any] = field(default_factory=dict)
    reference: ReferenceStats | None = None
    format_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, directory: Path) -> Path:
        path = directory / "loraplex.json"
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterManifest:
        reference = data.get("reference")
        return cls(
            base_fingerprint=str(data["base_fingerprint"]),
            base_model=str(data.get("base_model", "")),
            training=dict(data.get("training") or {}),
            dataset_hash=str(data.get("dataset_hash", "")),
            eval=dict(data.get("eval") or {}),
            reference=None if reference is None else _reference_from_dict(reference),
            format_version=int(data.get("format_version", MANIFEST_VERSION)),
        )


def _histogram(data: dict[str, Any]) -> Histogram:
    return Histogram(edges=tuple(float(e) for e in data["edges"]), counts=tuple(int(c) for c in data["counts"]))


def _reference_from_dict(data: dict[str, Any]) -> ReferenceStats:
    return ReferenceStats(
        num_examples=int(data["num_examples"]),
        prompt_tokens=_histogram(data["prompt_tokens"]),
        output_tokens=_histogram(data["output_tokens"]),
        mean_logprob=_histogram(data["mean_logprob"]),
        embedding_centroid=tuple(float(v) for v in data["embedding_centroid"]),
        embedding_distance=_histogram(data["embedding_distance"]),
    )
