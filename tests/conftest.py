"""Shared fixtures: the embedded base model, loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from loraplex.server.config import ModelSettings, default_cache_dir
from loraplex.server.core.shape import ModelShape
from loraplex.server.model import loader
from loraplex.server.model.embedded import resolve_model_dir
from loraplex.server.model.loader import LoadedBase, load_base

# The suite compares against PEFT at 1e-3, which float32 holds and bfloat16 (the CPU's ``auto`` where it has native
# bfloat16) does not: ``auto`` means float32 here, in this process and in the servers it starts. Tests of bfloat16
# ask for it by name; tests/unit/engine/test_dtype_rule.py checks what ``auto`` means outside the suite.
loader.CPU_AUTO_DTYPE = torch.float32
os.environ.setdefault("LORAPLEX_MODEL__DTYPE", "float32")


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
