"""Synthetic PEFT adapters for tests: the load tests' writer (``loadtests/synthetic_adapters.py``) under the name
the tests use, and a writer of whole named sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtests.synthetic_adapters import ALL_LINEAR, QV, write_adapter
from loraplex.server.core.shape import ModelShape

__all__ = ["ALL_LINEAR", "QV", "write_adapter", "write_adapter_set"]


def write_adapter_set(root: Path, shape: ModelShape, adapters: dict[str, dict[str, Any]]) -> Path:
    """Writes ``adapters`` (name -> :func:`write_adapter` keyword arguments) under ``root``, seeded 0, 1, ...
    in order; returns ``root``."""
    for seed, (name, kwargs) in enumerate(adapters.items()):
        write_adapter(root / name, shape, seed=seed, **kwargs)
    return root
