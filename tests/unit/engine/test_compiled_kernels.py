"""Ahead-of-time compiled kernels (server/lora/compiled.py): a package is built once at symbolic sizes, serves
other sizes, and is loaded from disk afterwards without building again; its key follows what its code depends on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.lora import compiled


def _scaled_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() * 2 + y.float()).to(x.dtype)


SIZES = {"x": ("T", "D"), "y": ("T", "D")}


def test_a_package_is_built_once_then_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [torch.randn(3, 5), torch.randn(3, 5)]
    kernel = compiled.load_or_build(_scaled_add, examples, SIZES, tmp_path)
    (package,) = tmp_path.glob("_scaled_add-*.pt2")  # no partial file left beside it
    x, y = torch.randn(7, 11), torch.randn(7, 11)  # other sizes than the examples': one package serves them
    torch.testing.assert_close(kernel(x, y), x * 2 + y)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_build)
    again = compiled.load_or_build(_scaled_add, examples, SIZES, tmp_path)
    torch.testing.assert_close(again(x, y), x * 2 + y)
    assert list(tmp_path.iterdir()) == [package]


def test_the_key_follows_dtype_and_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = [torch.zeros(2, 2), torch.zeros(2, 2)]
    key = compiled.package_key(_scaled_add, fp32)
    assert key == compiled.package_key(_scaled_add, [torch.ones(4, 4), torch.ones(4, 4)])  # sizes are symbolic
    assert key != compiled.package_key(_scaled_add, [t.bfloat16() for t in fp32])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # the generated code fixes its OpenMP team size
    assert key != compiled.package_key(_scaled_add, fp32)
