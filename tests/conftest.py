"""Shared fixtures: the embedded base model, loaded once per test session."""

from __future__ import annotations

import pytest

from loraplex.server.config import ModelSettings, default_cache_dir
from loraplex.server.core.shape import ModelShape
from loraplex.server.model.embedded import resolve_model_dir
from loraplex.server.model.loader import LoadedBase, load_base


@pytest.fixture(scope="session")
def base_dir() -> str:
    """The embedded base model's safetensors directory (converted once into the cache)."""
    return str(resolve_model_dir("embedded", default_cache_dir()))


@pytest.fixture(scope="session")
def base(base_dir: str) -> LoadedBase:
    return load_base(ModelSettings(base_model=base_dir))


@pytest.fixture(scope="session")
def shape(base: LoadedBase) -> ModelShape:
    return base.shape
