"""The training loop: data and base checked first, then AdamW steps over a deterministic plan, then the artifact.

Order of a run: read and tokenize the data (every data error surfaces here), load the base, wrap it in LoRA,
restore a checkpoint if asked, run ``total_steps`` optimizer steps (gradient accumulation, clipping, scheduler,
validation, early stopping, checkpoints), then on the main process: keep the best weights if early stopping,
write the adapter, evaluate adapter and base, compute reference statistics, write the manifest, the loss curve and
the eval report.

Data order is a seeded permutation per epoch and dropout is seeded per (step, rank), so the result depends only on
the config: a resumed run equals an uninterrupted one, and N processes equal one process with N× accumulation.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.server.model.loader import resolve_device
from loraplex.trainer.artifact import lora_parameters, write_adapter
from loraplex.trainer.checkpoint import (
    Progress,
    checkpoint_root,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.data import DataReport, PreparedData, prepare_data
from loraplex.trainer.distributed import Cluster, init_cluster, shutdown_cluster
from loraplex.trainer.errors import ConfigError
from loraplex.trainer.evaluate import EvalReport, evaluate, loss_sums
from loraplex.trainer.loss import completion_loss
from loraplex.trainer.model import TrainingBase, autocast_dtype, load_training_base, resolve_base
from loraplex.trainer.packing import collate
from loraplex.trainer.reference import build_manifest, reference_stats
from loraplex.trainer.report import LOSS_CURVE, ProgressBar, plot_loss, write_eval_report

log = logging.getLogger(__name__)

StepCallback = Callable[[Progress], None]
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class StepPlan:
    """Which rows each process trains on at each optimizer step."""

    num_rows: int
    batch_size: int
    accumulation: int
    world_size: int
    seed: int
    total_steps: int = field(init=False)
    steps_per_epoch: int = field(init=False)

    @classmethod
    def of(cls, config: TrainConfig, num_rows: int, world_size: int) -> StepPlan:
        plan = cls(num_rows, config.batch_size, config.gradient_accumulation_steps, world_size, config.seed)
        micro_per_epoch = math.ceil(num_rows / config.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / (config.gradient_accumulation_steps * world_size))
        object.__setattr__(plan, "steps_per_epoch", steps_per_epoch)
        total = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
        object.__setattr__(plan, "total_steps", total)
        return plan

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of this process's micro-batches at ``step`` (possibly none at an epoch's ragged end)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        chunks = [order[i : i + self.batch_size] for i in range(0, self.num_rows, self.batch_size)]
        per_step = self.accumulation * self.world_size
        return chunks[within * per_step : (within + 1) * per_step][rank :: self.world_size]


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]]
    tokens_per_second: float
    data: DataReport
    eval: EvalReport | None
    stopped_early: bool


def _interval(value: int | None, plan: StepPlan) -> int:
    return value if value is not None else plan.steps_per_epoch


class _Run:
    """One run's state between set-up and the artifact; a class so the loop reads top to bottom."""

    def __init__(self, config: TrainConfig, cluster: Cluster, base: TrainingBase, data: PreparedData) -> None:
        from transformers import get_scheduler

        self.config, self.cluster, self.base, self.data = config, cluster, base, data
        self.model = base.model
        self.device = base.device
        self.autocast = autocast_dtype(config, base.device)
        self.params = list(lora_parameters(self.model, config).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.plan = StepPlan.of(config, len(data.train_rows), cluster.world_size)
        warmup = (
            config.warmup_steps
            if config.warmup_steps is not None
            else round(config.warmup_ratio * self.plan.total_steps)
        )
        self.scheduler = get_scheduler(_SCHEDULERS[config.lr_scheduler], self.optimizer, warmup, self.plan.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast == torch.float16 else None
        self.progress = Progress()
        self.best: dict[str, torch.Tensor] | None = None
        self.pad_id = int(
            base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.tokenizer.eos_token_id
        )

    def resume(self) -> None:
        path = find_checkpoint(self.config)
        self.progress, self.best = load_checkpoint(
            path, self.config, self.model, self.optimizer, self.scheduler, self.data.dataset_hash
        )
        log.info("resumed from %s at step %d", path, self.progress.step)

    def _step(self) -> tuple[float, int]:
        """One optimizer step; returns (mean token loss over all processes, tokens this process saw)."""
        config, cluster = self.config, self.cluster
        torch.manual_seed(config.seed * 1_000_003 + self.progress.step * cluster.world_size + cluster.rank)
        rows = self.data.train_rows
        batches = [
            collate([rows[i] for i in m], self.pad_id, config.packing)
            for m in self.plan.micro_batches(self.progress.step, cluster.rank)
        ]
        targets = cluster.sum(float(sum(b.num_targets for b in batches)), self.device)
        loss_sum = 0.0
        for batch in batches:
            loss = completion_loss(self.model, batch.to(self.device), self.autocast)
            scaled: torch.Tensor = loss / targets
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            torch.autograd.backward(scaled)
            loss_sum += float(loss.detach())
        cluster.sum_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return cluster.sum(loss_sum, self.device) / targets, sum(b.num_tokens for b in batches)

    def _validate(self) -> float:
        total, count = loss_sums(
            self.model, self.data.val_encoded, self.config.eval_batch_size, self.device, self.autocast, self.cluster
        )
        return total / max(count, 1.0)

    def _after_validation(self, val_loss: float) -> None:
        progress = self.progress
        if val_loss < progress.best_val_loss:
            progress.best_val_loss, progress.best_step, progress.bad_evals = val_loss, progress.step, 0
            if self.config.early_stopping_patience is not None:
                self.best = {k: p.detach().cpu().clone() for k, p in lora_parameters(self.model, self.config).items()}
        else:
            progress.bad_evals += 1
            patience = self.config.early_stopping_patience
            progress.stopped_early = patience is not None and progress.bad_evals >= patience

    def loop(self, on_step: StepCallback | None) -> float:
        """Runs the remaining steps; returns training tokens/s of this process times the process count."""
        config, plan, progress = self.config, self.plan, self.progress
        eval_every, save_every = _interval(config.eval_steps, plan), _interval(config.save_steps, plan)
        bar = ProgressBar(plan.total_steps, progress.step, config.progress and self.cluster.is_main)
        rate = 0.0
        self.model.train()
        try:
            while progress.step < plan.total_steps and not progress.stopped_early:
                loss, tokens = self._step()
                progress.step += 1
                progress.tokens += tokens
                lr = float(self.scheduler.get_last_lr()[0])
                record = {"step": float(progress.step), "loss": loss, "lr": lr, "tokens": float(progress.tokens)}
                rate = bar.update(loss, lr, tokens * self.cluster.world_size)
                last = progress.step == plan.total_steps
                if self.data.val_encoded and (progress.step % eval_every == 0 or last):
                    record["val_loss"] = self._validate()
                    self._after_validation(record["val_loss"])
                    bar.write(f"step {progress.step}: validation loss {record['val_loss']:.4f}")
                progress.history.append(record)
                if progress.step % save_every == 0 and not last and not progress.stopped_early:
                    if self.cluster.is_main:
                        save_checkpoint(
                            config,
                            self.model,
                            self.optimizer,
                            self.scheduler,
                            progress,
                            self.best,
                            self.data.dataset_hash,
                        )
                    self.cluster.barrier()
                if on_step is not None:
                    on_step(progress)
        finally:
            bar.close()
        return rate

    def finish(self, rate: float) -> TrainResult:
        """Writes the artifact on the main process (keeping the best weights when early stopping)."""
        config = self.config
        if self.best is not None:
            with torch.no_grad():
                for key, param in lora_parameters(self.model, config).items():
                    param.copy_(self.best[key])
        report = None
        if self.cluster.is_main:
            report = self._write_artifact()
        self.cluster.barrier()
        return TrainResult(
            config.output_dir,
            self.progress.step,
            self.progress.history,
            rate,
            self.data.report,
            report,
            self.progress.stopped_early,
        )

    def _write_artifact(self) -> EvalReport | None:
        config, data, base = self.config, self.data, self.base
        out = config.output_dir
        write_adapter(out, self.model, config)
        report = None
        metrics: dict[str, Any] = {}
        if data.val_examples:
            report = evaluate(
                self.model,
                base.tokenizer,
                data.val_examples,
                data.val_encoded,
                max_examples=config.eval_max_examples,
                max_new_tokens=config.eval_max_new_tokens,
                batch_size=config.eval_batch_size,
                device=self.device,
                autocast=self.autocast,
            )
            metrics = {
                "adapter": report.adapter,
                "base": report.base,
                "num_examples": report.num_examples,
                "num_generated": report.num_generated,
            }
            write_eval_report(out, report)
        metrics |= {
            "steps": self.progress.step,
            "best_step": self.progress.best_step,
            "stopped_early": self.progress.stopped_early,
        }
        reference = reference_stats(self.model, base.tokenizer, data.val_examples, config.eval_batch_size, self.device)
        build_manifest(config, base.fingerprint, data.dataset_hash, metrics, reference).write(out)
        if self.progress.history:
            plot_loss(self.progress.history, out / LOSS_CURVE)
        return report


def train(config: TrainConfig, on_step: StepCallback | None = None) -> TrainResult:
    """Runs one training job end to end (one process of it under torchrun)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    model_dir, tokenizer, shape = resolve_base(config)
    data = prepare_data(config, tokenizer)
    log.info("data: %s", data.report.describe())
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cluster, device = init_cluster(device)
    try:
        if config.resume_from_checkpoint is None and cluster.is_main:
            shutil.rmtree(checkpoint_root(config), ignore_errors=True)
        base = load_training_base(config, model_dir, tokenizer, shape, device)
        run = _Run(config, cluster, base, data)
        if config.resume_from_checkpoint is not None:
            run.resume()
        rate = run.loop(on_step)
        return run.finish(rate)
    finally:
        shutdown_cluster(cluster)
