"""Resumable checkpoints: ``OUTPUT/checkpoints/step-NNNNNN/`` = an adapter directory + ``trainer_state.pt``.

The state holds the optimizer and scheduler, the run's :class:`Progress` (step, loss history, early-stopping
counters) and the best weights so far. Data order and dropout are functions of (seed, step), so nothing else is
needed for a resumed run to reach the same result as an uninterrupted one. A checkpoint is written into a
temporary directory and renamed into place, so an interrupted save never leaves a half checkpoint.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.trainer.artifact import read_weights, write_adapter
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.errors import ConfigError

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
# Keys that must match between a checkpoint and the run resuming it.
_FIXED_KEYS = ("base_model", "method", "r", "lora_alpha", "target_modules", "seed", "packing", "max_length")


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # {step, loss, lr, tokens[, val_loss]}


def checkpoint_root(config: TrainConfig) -> Path:
    return config.output_dir / CHECKPOINTS


def save_checkpoint(
    config: TrainConfig,
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    best: dict[str, torch.Tensor] | None,
    dataset_hash: str,
) -> Path:
    root = checkpoint_root(config)
    final = root / f"step-{progress.step:06d}"
    staging = root / f".step-{progress.step:06d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_adapter(staging, peft_model, config)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": asdict(progress),
            "best": best,
            "config": config.as_record(),
            "dataset_hash": dataset_hash,
        },
        staging / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in sorted(root.glob("step-*"))[: -config.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(config: TrainConfig) -> Path:
    """The directory ``resume_from_checkpoint`` names (``latest`` = the newest under the output directory)."""
    assert config.resume_from_checkpoint is not None
    if config.resume_from_checkpoint == "latest":
        found = sorted(checkpoint_root(config).glob("step-*"))
        if not found:
            raise ConfigError(f"resume_from_checkpoint: latest, but {checkpoint_root(config)} holds no checkpoint")
        return found[-1]
    path = Path(config.resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_checkpoint(
    path: Path,
    config: TrainConfig,
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    dataset_hash: str,
) -> tuple[Progress, dict[str, torch.Tensor] | None]:
    """Restores weights, optimizer and scheduler from ``path``; refuses a checkpoint of a different run."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    saved, current = state["config"], config.as_record()
    changed = [key for key in _FIXED_KEYS if saved.get(key) != current.get(key)]
    if state["dataset_hash"] != dataset_hash:
        changed.append("datasets (content)")
    if changed:
        raise ConfigError(f"cannot resume from {path}: the run changed {changed}; start a new output_dir instead")
    read_weights(path, peft_model, config)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Progress(**state["progress"]), state["best"]
