"""Training benchmark: ``loraplex-train`` against a plain transformers ``Trainer`` + PEFT script, side by side.

Both train the same LoRA (rank 8 on q,k,v,o of the embedded SmolLM2-135M base, float32, AdamW, cosine schedule)
on the same rows in the same order: the demo ``date-iso`` data tokenized once by the trainer's encoder, in
micro-batches of 8, with packing off (padded rows) and on (512-token packed rows). The ``Trainer`` gets those
batches through a sequential sampler and the trainer's own collator, and computes its loss the usual way
(``model(labels=...)``). Throughput is real (non-padding) tokens per second over the steps after the first
(warm-up) step; the ratio is loraplex / Trainer, measured in this one run.

    python loadtests/bench_train.py --quick     # 6 steps per system and packing mode (~5 minutes on 2 cores)
    python loadtests/bench_train.py --steps 20  # longer, steadier numbers
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from loraplex.server.config import default_cache_dir
from loraplex.server.model.embedded import resolve_model_dir
from loraplex.trainer.checkpoint import Progress
from loraplex.trainer.config import TrainConfig, load_config
from loraplex.trainer.data import prepare_data
from loraplex.trainer.demo.tasks import TASKS, write_task_data
from loraplex.trainer.model import lora_config, resolve_base
from loraplex.trainer.packing import Row, collate
from loraplex.trainer.train import StepPlan, train

BATCH = 8


def _config(base: str, train_file: Path, out: Path, packing: bool, steps: int) -> TrainConfig:
    return load_config(
        None,
        {
            "base_model": base,
            "datasets": [{"path": str(train_file), "format": "alpaca"}],
            "val_size": 0,
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "max_length": 512 if packing else 128,
            "packing": packing,
            "batch_size": BATCH,
            "max_steps": steps,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "mixed_precision": "no",
            "output_dir": str(out),
            "save_steps": 10_000,
            "progress": False,
            "seed": 0,
        },
    )


def _rate(marks: list[tuple[float, float]]) -> float:
    """Tokens/s between the end of the first step and the end of the last (marks: (time, cumulative tokens))."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


def bench_loraplex(config: TrainConfig) -> float:
    marks: list[tuple[float, float]] = []

    def mark(progress: Progress) -> None:
        marks.append((time.perf_counter(), float(progress.tokens)))

    train(config, on_step=mark)
    return _rate(marks)


def bench_trainer(config: TrainConfig, rows: list[Row], pad_id: int) -> float:
    """transformers Trainer + PEFT on the rows loraplex trained on, in the same order."""
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model_dir, _, _ = resolve_base(config)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config(config))
    plan = StepPlan.of(config, len(rows), world_size=1)
    ordered = [rows[i] for step in range(plan.total_steps) for batch in plan.micro_batches(step, 0) for i in batch]
    collated: deque[int] = deque()  # token counts of batches collated but not yet trained on (prefetch)
    trained = [0]
    marks: list[tuple[float, float]] = []

    def collator(features: list[Row]) -> dict[str, Any]:
        batch = collate(features, pad_id, config.packing)
        collated.append(batch.num_tokens)
        fields = {"input_ids": batch.input_ids, "labels": batch.labels}
        if batch.attention_mask is not None:
            fields["attention_mask"] = batch.attention_mask
        if batch.position_ids is not None:
            fields["position_ids"] = batch.position_ids
        return fields

    class Marks(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            marks.append((time.perf_counter(), float(trained[0])))

    class Ordered(Trainer):  # type: ignore[misc]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            trained[0] += collated.popleft()
            loss: torch.Tensor = super().training_step(*args, **kwargs)
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=config.max_steps,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            max_grad_norm=1.0,
            weight_decay=0.0,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=0,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Ordered(model=model, args=args, train_dataset=ordered, data_collator=collator, callbacks=[Marks()])
        trainer.train()
    return _rate(marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 steps per run")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    base = str(resolve_model_dir("embedded", default_cache_dir()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train_file, _ = write_task_data(TASKS["date-iso"], Path(tmp) / "data", train=800, test=1)
        for packing in (False, True):
            config = _config(base, train_file, Path(tmp) / f"out-{packing}", packing, steps)
            _, tokenizer, _ = resolve_base(config)
            rows = prepare_data(config, tokenizer).train_rows
            pad = int(tokenizer.pad_token_id)
            ours = bench_loraplex(config)
            theirs = bench_trainer(config, rows, pad)
            results.append((packing, ours, theirs))
            print(
                f"packing={'on ' if packing else 'off'}  loraplex-train {ours:8.1f} tok/s   "
                f"Trainer+PEFT {theirs:8.1f} tok/s   ratio {ours / theirs:5.2f}",
                flush=True,
            )
    print(f"\nsteps per run: {steps} (first excluded), batch {BATCH}, torch threads {torch.get_num_threads()}")
    print("| packing | loraplex-train tok/s | Trainer + PEFT tok/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for packing, ours, theirs in results:
        ratio = ours / theirs if theirs and not math.isnan(theirs) else math.nan
        print(f"| {'on' if packing else 'off'} | {ours:.0f} | {theirs:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
