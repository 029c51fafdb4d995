"""Reading PEFT adapter directories: scaling conventions, and one clear rejection for every bad-adapter case."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import (
    AdapterLimits,
    AdapterRejected,
    lora_scaling,
    module_path,
    peft_key,
    read_adapter,
)
from tests.support.adapters import QV, write_adapter
from tests.support.shapes import TINY_SHAPE as SHAPE

OTHER = ModelShape(
    "llama",
    hidden_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=24,
    intermediate_size=128,
    vocab_size=100,
)
LIMITS = AdapterLimits(max_rank=64, max_file_bytes=1 << 20)


def test_scaling_conventions() -> None:
    assert lora_scaling(16, 8, use_rslora=False) == 2.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0
    assert math.isclose(lora_scaling(8, 2, use_rslora=True), 8 / math.sqrt(2))


def test_reads_scaling_rank_and_alpha_patterns(tmp_path: Path) -> None:
    directory = write_adapter(
        tmp_path / "a",
        SHAPE,
        rank=8,
        targets=QV,
        alpha=16,
        rank_pattern={"layers.1.self_attn.q_proj": 4},
        alpha_pattern={"v_proj": 4},
    )
    raw = load_file(str(directory / "adapter_model.safetensors"))
    weights = read_adapter("a", directory, SHAPE, LIMITS)
    assert weights.rank == 8 and weights.target_modules == {"q_proj", "v_proj"}
    q1 = weights.modules[(1, "q_proj")]
    assert q1.a.shape == (4, 64)
    torch.testing.assert_close(q1.b, raw[peft_key(1, "q_proj", "lora_B.weight")] * (16 / 4))
    torch.testing.assert_close(weights.modules[(0, "v_proj")].b, raw[peft_key(0, "v_proj", "lora_B.weight")] * (4 / 8))
    torch.testing.assert_close(weights.modules[(0, "q_proj")].b, raw[peft_key(0, "q_proj", "lora_B.weight")] * 2)


def test_rslora_scaling(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "a", SHAPE, rank=16, alpha=8, use_rslora=True)
    raw = load_file(str(directory / "adapter_model.safetensors"))
    weights = read_adapter("a", directory, SHAPE, LIMITS)
    torch.testing.assert_close(weights.modules[(0, "q_proj")].b, raw[peft_key(0, "q_proj", "lora_B.weight")] * 2.0)


def test_layers_to_transform_and_content_hash(tmp_path: Path) -> None:
    one = read_adapter("a", write_adapter(tmp_path / "a", SHAPE, 4, layers=[1]), SHAPE, LIMITS)
    assert one.layers == {1}
    same = read_adapter("b", write_adapter(tmp_path / "b", SHAPE, 4, layers=[1]), SHAPE, LIMITS)
    other = read_adapter("c", write_adapter(tmp_path / "c", SHAPE, 4, layers=[1], seed=9), SHAPE, LIMITS)
    assert one.content_hash == same.content_hash != other.content_hash


def _edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _truncate(d: Path) -> None:
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_only(d: Path) -> None:
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[peft_key(0, "q_proj", "lora_B.weight")][0, 0] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[peft_key(1, "v_proj", "lora_A.weight")][0, 0] = float("inf")


def _int_dtype(t: dict[str, torch.Tensor]) -> None:
    key = peft_key(0, "q_proj", "lora_A.weight")
    t[key] = t[key].to(torch.int32)


def _missing_b(t: dict[str, torch.Tensor]) -> None:
    del t[peft_key(0, "q_proj", "lora_B.weight")]


def _foreign_module(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)


def _layer_out_of_range(t: dict[str, torch.Tensor]) -> None:
    t[peft_key(7, "q_proj", "lora_A.weight")] = torch.zeros(4, 64)


BAD_CASES = {
    "missing config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "corrupt config": (lambda d: (d / "adapter_config.json").write_text("{nope"), "not readable JSON"),
    "missing weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    "pickle weights only": (_pickle_only, "never unpickles"),
    "truncated safetensors": (_truncate, "corrupt or truncated"),
    "unknown peft_type": (lambda d: _edit_config(d, peft_type="IA3"), "peft_type is 'IA3'"),
    "rank above maximum": (lambda d: _edit_config(d, r=65), "exceeds the server's maximum 64"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (lambda d: _edit_config(d, bias="all"), "bias="),
    "NaN weights": (lambda d: _edit_tensors(d, _nan), "NaN or Inf"),
    "Inf weights": (lambda d: _edit_tensors(d, _inf), "NaN or Inf"),
    "integer dtype": (lambda d: _edit_tensors(d, _int_dtype), "dtype torch.int32"),
    "missing lora_B": (lambda d: _edit_tensors(d, _missing_b), "needs both lora_A and lora_B"),
    "unsupported module": (lambda d: _edit_tensors(d, _foreign_module), "not a LoRA weight of a decoder layer"),
    "layer beyond the base": (lambda d: _edit_tensors(d, _layer_out_of_range), "base has 2 layers"),
    "file over the size limit": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"\0" * ((1 << 20) + 1)),
        "over the limit",
    ),
    "dora flag without magnitudes": (lambda d: _edit_config(d, use_dora=True), "lora_magnitude_vector is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_adapter_rejected_with_reason(tmp_path: Path, case: str) -> None:
    directory = write_adapter(tmp_path / "bad", SHAPE, rank=4)
    damage, expected = BAD_CASES[case]
    damage(directory)
    with pytest.raises(AdapterRejected) as raised:
        read_adapter("bad", directory, SHAPE, LIMITS)
    assert expected in str(raised.value), str(raised.value)
    assert "adapter 'bad' rejected" in str(raised.value)


def test_shapes_for_another_base_rejected(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "foreign", OTHER, rank=4)
    with pytest.raises(AdapterRejected, match=r"do not fit this base"):
        read_adapter("foreign", directory, SHAPE, LIMITS)


def test_foreign_fingerprint_rejected(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "a", SHAPE, rank=4)
    (directory / "loraplex.json").write_text(json.dumps({"base_fingerprint": "sha256:other"}))
    with pytest.raises(AdapterRejected, match="trained for another base model"):
        read_adapter("a", directory, SHAPE, LIMITS, base_fingerprint="sha256:this")
    assert read_adapter("a", directory, SHAPE, LIMITS, base_fingerprint="sha256:other").rank == 4


def test_all_problems_reported_together(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "bad", SHAPE, rank=4)
    _edit_config(directory, peft_type="IA3", bias="all")
    with pytest.raises(AdapterRejected) as raised:
        read_adapter("bad", directory, SHAPE, LIMITS)
    assert len(raised.value.problems) == 2


def test_module_path_matches_peft_names() -> None:
    assert module_path(3, "gate_proj") == "model.layers.3.mlp.gate_proj"
    assert peft_key(0, "o_proj", "lora_A.weight") == "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
