"""The training config: YAML + flags, and every bad key refused with its name before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.trainer.cli import parser
from loraplex.trainer.config import flag_values, load_config
from loraplex.trainer.errors import ConfigError

DATA = [{"path": "train.jsonl", "format": "alpaca"}]


def test_yaml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("base_model: embedded\nr: 16\ndatasets: [{path: data/train.jsonl, format: chat}]\n")
    args = parser().parse_args(
        [
            "train",
            str(path),
            "--learning-rate",
            "1e-3",
            "--target-modules",
            "q_proj,k_proj",
            "--packing",
            "true",
            "--max_steps",
            "7",
        ]
    )
    config = load_config(args.config, flag_values(args))
    assert (config.r, config.learning_rate, config.packing, config.max_steps) == (16, 1e-3, True, 7)
    assert config.target_modules == ("q_proj", "k_proj")
    assert config.datasets[0].path == tmp_path / "data" / "train.jsonl"  # relative to the config file
    assert config.datasets[0].format == "chat"


def test_dataset_flag_as_path_and_format() -> None:
    args = parser().parse_args(["train", "--datasets", "a.jsonl:alpaca,b.json:text"])
    config = load_config(None, flag_values(args))
    assert [(str(d.path), d.format) for d in config.datasets] == [("a.jsonl", "alpaca"), ("b.json", "text")]


def test_all_linear_expands() -> None:
    config = load_config(None, {"datasets": DATA, "target_modules": "all-linear"})
    assert config.modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"datasets": DATA, "learning_rte": 1e-3}, "learning_rte"),
        ({"datasets": DATA, "target_modules": ["q_proj", "lm_head"]}, "unsupported target module(s) ['lm_head']"),
        ({"datasets": DATA, "method": "ia3"}, "method"),
        ({"datasets": [{"path": "a.jsonl", "format": "sharegpt"}]}, "unknown dataset format 'sharegpt'"),
        ({"datasets": ["a.jsonl"]}, "PATH:FORMAT"),
        ({}, "no training data"),
        ({"datasets": DATA, "r": 0}, "r:"),
        ({"datasets": DATA, "lr_scheduler": "cosine_restarts"}, "lr_scheduler"),
    ],
)
def test_bad_config_is_named(tree: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid training config") as caught:
        load_config(None, tree)
    assert message in str(caught.value)


def test_unreadable_config_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)
