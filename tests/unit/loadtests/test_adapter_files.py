"""AdminUser's replace step: rewriting an adapter's weights keeps names, shapes and dtypes, changes the content, and
swaps the file in atomically under PEFT's file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from loadtests.adapter_files import WEIGHTS_FILE, rewrite_weights
from loadtests.synthetic_adapters import write_adapter
from loraplex.server.lora import format as peft_format
from tests.support.shapes import TINY_SHAPE as SHAPE


def test_rewrite_scales_lora_b_only(tmp_path: Path) -> None:
    assert WEIGHTS_FILE == peft_format.WEIGHTS_FILE
    directory = write_adapter(tmp_path / "a", SHAPE, rank=4, seed=1, dtype=torch.float16)
    before = load_file(str(directory / WEIGHTS_FILE))
    rewrite_weights(directory, 2.0)
    after = load_file(str(directory / WEIGHTS_FILE))
    assert sorted(after) == sorted(before)
    for name, value in after.items():
        assert value.shape == before[name].shape and value.dtype == np.float16
        expected = before[name] * 2.0 if "lora_B" in name else before[name]
        np.testing.assert_array_equal(value, expected.astype(np.float16))
    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_FILE, peft_format.CONFIG_FILE])
