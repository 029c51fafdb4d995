"""Kernels compiled ahead of time: a torch function exported with symbolic sizes, built by AOTInductor into a C++
package once, cached on disk and loaded in milliseconds afterwards.

Why not ``torch.compile``: its call path (frame evaluation, guards, the AOTAutograd wrappers) costs about 50-60 µs
per call on this CPU, twice the fused LoRA kernel's own work at 32 decode rows, and a LoRA layer runs it 60 to 210
times per step. An AOTInductor package is called through one C++ runner (about 40 µs in all, kernel included).

A package is keyed by everything its code depends on: the function's source, the example inputs' dtypes, torch's
version, the CPU capability and the OpenMP thread count (the generated code fixes its team size). Packages are
written to a temporary name and renamed, so processes that build the same one at once never read a partial file.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from loraplex.server.config import default_cache_dir

log = logging.getLogger(__name__)

Kernel = Callable[..., torch.Tensor]


class _Wrapped(nn.Module):
    """``torch.export`` exports modules: this one calls ``fn``."""

    def __init__(self, fn: Kernel) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def package_key(fn: Kernel, examples: Sequence[torch.Tensor]) -> str:
    """What the package's code depends on, hashed."""
    parts = [
        inspect.getsource(fn),
        ",".join(str(t.dtype) for t in examples),
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        str(torch.get_num_threads()),
        sys.version,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def load_or_build(
    fn: Kernel,
    examples: Sequence[torch.Tensor],
    sizes: Mapping[str, Sequence[str]],
    kernel_dir: Path | None = None,
) -> Kernel:
    """``fn`` as an AOTInductor package: loaded from ``kernel_dir`` when built before, else exported at
    ``examples`` and built there. ``sizes`` names each argument's dimensions; a name shared by two arguments is one
    symbolic size, and every size is symbolic with a minimum of 2 (sizes of one would specialise the code). The
    examples must give distinct names distinct values, or export would tie them. ``kernel_dir`` defaults to
    ``kernels/`` in the converted-model cache (:func:`default_cache_dir`). Raises whatever the build raises
    (no C++ compiler, an unsupported operation): the caller decides what to run instead."""
    directory = kernel_dir or default_cache_dir() / "kernels"
    path = directory / f"{fn.__name__}-{package_key(fn, examples)}.pt2"
    if not path.exists():
        dims = {name: Dim(name, min=2) for names in sizes.values() for name in names}
        names = list(inspect.signature(fn).parameters)
        dynamic = tuple(tuple(dims[d] for d in sizes[name]) for name in names)
        exported = torch.export.export(_Wrapped(fn), tuple(examples), dynamic_shapes=(dynamic,))
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{os.getpid()}-{path.name}")
        torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
        partial.replace(path)
        log.info("built %s", path)
    runner: Kernel = torch._inductor.aoti_load_package(str(path))
    return runner
