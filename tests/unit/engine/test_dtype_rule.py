"""What ``model.dtype: auto`` resolves to (the suite itself runs float32: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.model import loader

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_where_the_cpu_multiplies_it_natively(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(loader, "CPU_AUTO_DTYPE", torch.bfloat16)  # the shipped rule, not the suite's pin
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    assert loader.resolve_dtype("auto", CPU) is (torch.bfloat16 if native else torch.float32)
    assert loader.resolve_dtype("auto", CPU, "nf4") is torch.float32  # quantized bases keep float32 compute
    assert loader.resolve_dtype("auto", CPU, "int8") is torch.float32
    assert loader.resolve_dtype("auto", CUDA) is torch.bfloat16
    assert loader.resolve_dtype("float32", CPU) is torch.float32
    assert loader.resolve_dtype("bfloat16", CPU) is torch.bfloat16


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # Zen 4, Cooper Lake
        ("fpu avx2 avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
        ("fpu avx2 avx512f avx512bw avx512vl avx512dq", False),  # Skylake: oneDNN would emulate bfloat16
        ("fpu sse2 avx2", False),
    ],
)
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert loader.cpu_has_native_bf16(cpuinfo) is native
    assert loader.cpu_has_native_bf16(tmp_path / "missing") is False


def test_the_suite_runs_float32() -> None:
    assert loader.resolve_dtype("auto", CPU) is torch.float32
