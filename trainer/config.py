"""The training config: one flat, typed tree of the keys LLaMA-Factory / Axolotl / TRL users know.

Sources, weakest first: the defaults below, a YAML file (``loraplex-train train CONFIG.yaml``), then flags
(``--learning-rate 1e-3``; every key is a flag, values are read as YAML, lists also as ``a,b,c``). Unknown keys
and bad values are refused with the key's name before anything is loaded.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplex.server.core.shape import TARGET_MODULES
from loraplex.trainer.errors import ConfigError

Method = Literal["lora", "qlora", "dora", "rslora"]
DatasetFormat = Literal["alpaca", "chat", "prompt_completion", "text"]
DATASET_FORMATS: tuple[str, ...] = get_args(DatasetFormat)
ALL_LINEAR = "all-linear"


class DatasetSpec(BaseModel):
    """One JSON or JSONL file and the format of its records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    format: str = Field(description=f"one of {', '.join(DATASET_FORMATS)}")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """``PATH:FORMAT`` on the command line."""
        if isinstance(value, str):
            path, _, fmt = value.rpartition(":")
            if not path:
                raise ValueError(f"write a dataset as PATH:FORMAT (format one of {', '.join(DATASET_FORMATS)})")
            return {"path": path, "format": fmt}
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in DATASET_FORMATS:
            raise ValueError(f"unknown dataset format '{value}'; use one of {', '.join(DATASET_FORMATS)}")
        return value


class TrainConfig(BaseModel):
    """Everything one run needs. Field descriptions double as ``--help`` text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # model and adapter
    base_model: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct), an HF model dir or .gguf")
    method: Method = Field("lora", description="lora | qlora (4-bit nf4 base) | dora | rslora")
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling alpha/r, alpha/sqrt(r) for rslora)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: tuple[str, ...] | Literal["all-linear"] = Field(
        ("q_proj", "v_proj"), description=f"modules to adapt, or all-linear; any of {', '.join(TARGET_MODULES)}"
    )
    # data
    datasets: tuple[DatasetSpec, ...] = Field((), description="training files: PATH:FORMAT,... or [{path, format}]")
    val_datasets: tuple[DatasetSpec, ...] = Field((), description="held-out files; default: split val_size off")
    val_size: float = Field(0.1, ge=0, description="fraction (<1) or count (>=1) of examples held out")
    max_length: int = Field(512, ge=8, description="tokens per example (per packed row with packing)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="what happens to longer examples")
    train_on_prompt: bool = Field(False, description="also train on prompt tokens (default: completion only)")
    packing: bool = Field(False, description="pack several examples into each max_length row")
    # optimisation
    num_epochs: float = Field(3.0, gt=0, description="passes over the training set (unless max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides num_epochs")
    batch_size: int = Field(4, ge=1, description="examples (or packed rows) per micro-batch per process")
    eval_batch_size: int = Field(8, ge=1, description="examples per evaluation batch")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of steps warming up linearly")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps; overrides warmup_ratio")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; null = off")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a GPU that has it, else fp16 on GPU, no on CPU"
    )
    # evaluation, checkpoints, stopping
    eval_steps: int | None = Field(None, ge=1, description="validate every N steps; default: once per epoch")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps; default: once per epoch")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (oldest removed)")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after N validations without a lower loss; then keep the best weights"
    )
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint directory")
    eval_max_examples: int = Field(64, ge=0, description="held-out examples generated for the eval report")
    eval_max_new_tokens: int | None = Field(None, ge=1, description="default: longest reference + 8")
    # run
    seed: int = Field(42, ge=0, description="seeds data order, LoRA init and dropout")
    output_dir: Path = Field(Path("outputs/adapter"), description="where the adapter directory is written")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules(cls, value: Any) -> Any:
        if isinstance(value, str) and value != ALL_LINEAR:
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list | tuple):
            unknown = sorted(set(value) - set(TARGET_MODULES))
            if unknown:
                raise ValueError(
                    f"unsupported target module(s) {unknown}: loraplex adapts only {', '.join(TARGET_MODULES)} "
                    f"(or '{ALL_LINEAR}')"
                )
            if not value:
                raise ValueError(f"name at least one target module, or '{ALL_LINEAR}'")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.datasets:
            raise ValueError("no training data: set datasets: [{path: train.jsonl, format: alpaca}]")
        return self

    @property
    def modules(self) -> tuple[str, ...]:
        """The target modules as names, ``all-linear`` expanded."""
        return TARGET_MODULES if self.target_modules == ALL_LINEAR else tuple(self.target_modules)

    def as_record(self) -> dict[str, Any]:
        """The config as JSON-ready values (for the manifest and checkpoints)."""
        return self.model_dump(mode="json")


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors())


def _is_sequence(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_sequence(arg) for arg in get_args(annotation))
    return get_origin(annotation) is tuple


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--<key>`` for every config key (dashes or underscores), each parsed as YAML."""
    group = parser.add_argument_group("config keys (override the file)")
    for key, field in TrainConfig.model_fields.items():
        flags = sorted({f"--{key.replace('_', '-')}", f"--{key}"})
        shown = f"{field.description} (default: {field.default})"
        group.add_argument(*flags, dest=f"cfg.{key}", default=None, metavar="VALUE", help=shown)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given as flags, parsed: YAML scalars, lists as YAML or comma-separated."""
    values: dict[str, Any] = {}
    for dest, raw in vars(args).items():
        if not dest.startswith("cfg.") or raw is None:
            continue
        key = dest.removeprefix("cfg.")
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError as exc:
            raise ConfigError(f"--{key.replace('_', '-')}: cannot read {raw!r} ({exc})") from exc
        annotation = TrainConfig.model_fields[key].annotation
        if isinstance(value, str) and _is_sequence(annotation) and key != "target_modules":
            value = [item for item in value.split(",") if item]
        values[key] = value
    return values


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config from a YAML file and overrides (flags); raises :class:`ConfigError` naming every bad key."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys (base_model: ..., datasets: ...)")
        tree.update(loaded)
        tree = _relative_to(tree, path.parent)
    tree.update(overrides or {})
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid training config: {_errors(exc)}") from exc


def _relative_to(tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Dataset paths in a config file are relative to the file, like an include."""
    for key in ("datasets", "val_datasets"):
        specs = tree.get(key)
        if isinstance(specs, Sequence) and not isinstance(specs, str):
            tree[key] = [_relative_spec(spec, folder) for spec in specs]
    return tree


def _relative_spec(spec: Any, folder: Path) -> Any:
    if isinstance(spec, dict) and "path" in spec:
        return {**spec, "path": str(folder / spec["path"])}
    if isinstance(spec, str) and ":" in spec:
        return str(folder / spec)
    return spec
