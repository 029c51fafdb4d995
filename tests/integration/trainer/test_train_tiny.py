"""Tiny training runs on a random 2-layer Llama: loss falls, the artifact is complete, resume is exact, qlora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraplex.server.lora.format import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from loraplex.server.lora.manifest import AdapterManifest
from loraplex.trainer.checkpoint import Progress
from loraplex.trainer.config import load_config
from loraplex.trainer.data import held_out
from loraplex.trainer.evaluate import loss_sums
from loraplex.trainer.model import load_trained
from loraplex.trainer.report import EVAL_JSON, EVAL_MARKDOWN, LOSS_CURVE
from loraplex.trainer.train import train
from tests.unit.trainer.tiny import alpaca_records, assert_same_weights, config_tree, write_jsonl


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_records(24))


def test_loss_falls_on_a_memorisable_set(tiny_base: Path, train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = load_config(
        None,
        config_tree(
            tiny_base,
            train_file,
            out,
            max_steps=24,
            target_modules="all-linear",
            r=8,
            learning_rate=2e-2,
            warmup_steps=2,
            eval_steps=8,
        ),
    )
    result = train(config)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert result.eval is not None
    assert result.eval.adapter["loss"] < 0.5 * result.eval.base["loss"]
    assert [h["step"] for h in result.history if "val_loss" in h] == [8.0, 16.0, 24.0]
    for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, LOSS_CURVE, EVAL_JSON, EVAL_MARKDOWN):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob(".*partial"))
    adapter_config = json.loads((out / CONFIG_FILE).read_text())
    assert (adapter_config["peft_type"], adapter_config["r"], adapter_config["lora_alpha"]) == ("LORA", 8, 8)
    assert adapter_config["target_modules"] == sorted(config.modules)
    manifest = AdapterManifest.from_dict(json.loads((out / MANIFEST_FILE).read_text()))
    assert manifest.base_fingerprint.startswith("sha256:")
    assert manifest.training["learning_rate"] == 2e-2 and manifest.dataset_hash.startswith("sha256:")
    assert manifest.eval["adapter"]["loss"] == pytest.approx(result.eval.adapter["loss"])
    reference = manifest.reference
    assert reference is not None and reference.num_examples == 4
    assert len(reference.embedding_centroid) == 64  # the tiny base's hidden size
    assert sum(reference.prompt_tokens.counts) == sum(reference.mean_logprob.counts) == 4


def test_resume_equals_an_uninterrupted_run(tiny_base: Path, train_file: Path, tmp_path: Path) -> None:
    keys = {
        "max_steps": 7,
        "save_steps": 3,
        "eval_steps": 2,
        "lora_dropout": 0.2,
        "batch_size": 3,
        "gradient_accumulation_steps": 2,
        "eval_max_examples": 0,
    }
    straight = train(load_config(None, config_tree(tiny_base, train_file, tmp_path / "a", **keys)))

    class Interrupted(Exception):
        pass

    def stop_at_five(progress: Progress) -> None:
        if progress.step == 5:
            raise Interrupted

    interrupted = load_config(None, config_tree(tiny_base, train_file, tmp_path / "b", **keys))
    with pytest.raises(Interrupted):
        train(interrupted, on_step=stop_at_five)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000003"]
    resumed = train(interrupted.model_copy(update={"resume_from_checkpoint": "latest"}))
    assert resumed.steps == straight.steps == 7
    assert resumed.history == straight.history  # losses, learning rates, validation losses, step for step
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_resume_refuses_a_changed_run(tiny_base: Path, train_file: Path, tmp_path: Path) -> None:
    from loraplex.trainer.errors import ConfigError

    tree = config_tree(tiny_base, train_file, tmp_path / "c", max_steps=4, save_steps=2, eval_max_examples=0)
    train(load_config(None, tree))
    changed = load_config(None, tree | {"r": 8, "resume_from_checkpoint": "latest"})
    with pytest.raises(ConfigError, match=r"the run changed \['r'\]"):
        train(changed)


def test_qlora_trains_an_nf4_base_and_the_adapter_reloads(tiny_base: Path, train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    config = load_config(
        None,
        config_tree(
            tiny_base,
            train_file,
            out,
            method="qlora",
            max_steps=8,
            learning_rate=2e-2,
            target_modules="all-linear",
            eval_max_examples=0,
        ),
    )
    result = train(config)
    assert result.eval is not None
    assert result.eval.adapter["loss"] < result.eval.base["loss"]
    peft_model, tokenizer = load_trained(out, config, torch.device("cpu"))
    linear = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    _, encoded = held_out(config, tokenizer)
    total, count = loss_sums(peft_model, encoded, 8, torch.device("cpu"), None)
    assert total / count == pytest.approx(result.eval.adapter["loss"], rel=1e-4)


def test_early_stopping_keeps_the_best_weights(tiny_base: Path, train_file: Path, tmp_path: Path) -> None:
    """A learning rate far too high: validation loss rises, the run stops after `patience` evaluations."""
    tree = config_tree(
        tiny_base,
        train_file,
        tmp_path / "es",
        max_steps=12,
        learning_rate=0.5,
        eval_steps=1,
        early_stopping_patience=2,
        lr_scheduler="constant",
        eval_max_examples=0,
    )
    result = train(load_config(None, tree))
    val_losses = [h["val_loss"] for h in result.history]
    assert result.stopped_early and result.steps == 3  # of 12
    assert val_losses[1] > val_losses[0] and val_losses[2] > val_losses[0]
    assert result.eval is not None
    assert result.eval.adapter["loss"] == pytest.approx(min(val_losses), rel=1e-5)  # step 1's weights were kept
