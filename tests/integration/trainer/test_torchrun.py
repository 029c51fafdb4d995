"""``torchrun --nproc_per_node 2`` on CPU (gloo) writes the same adapter as one process with 2× accumulation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from loraplex.server.lora.format import MANIFEST_FILE
from loraplex.trainer.config import load_config
from loraplex.trainer.train import train
from tests.unit.trainer.tiny import alpaca_records, assert_same_weights, config_tree, write_jsonl


def test_two_cpu_processes_equal_one_with_accumulation(tiny_base: Path, tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_records(30))
    keys = {"max_steps": 4, "batch_size": 3, "eval_steps": 2, "eval_max_examples": 2}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config_tree(tiny_base, train_file, tmp_path / "ddp", **keys)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "loraplex.trainer.cli",
        "train",
        str(config_file),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / MANIFEST_FILE).is_file()

    single = config_tree(tiny_base, train_file, tmp_path / "single", **keys, gradient_accumulation_steps=2)
    result = train(load_config(None, single))
    assert_same_weights(tmp_path / "ddp", tmp_path / "single", atol=2e-6)
    assert result.steps == 4
