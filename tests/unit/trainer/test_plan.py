"""The step plan: seeded epochs, and N processes see exactly what one process sees with N× accumulation."""

from __future__ import annotations

from loraplex.trainer.config import TrainConfig
from loraplex.trainer.train import StepPlan

DATA = ({"path": "x.jsonl", "format": "text"},)


def _plan(world: int, accumulation: int, **keys: object) -> StepPlan:
    config = TrainConfig(datasets=DATA, batch_size=2, gradient_accumulation_steps=accumulation, **keys)  # type: ignore[arg-type]
    return StepPlan.of(config, num_rows=21, world_size=world)


def test_epochs_and_total_steps() -> None:
    plan = _plan(1, 4, num_epochs=2.5)
    assert plan.steps_per_epoch == 3  # 11 micro-batches, 4 per step
    assert plan.total_steps == 8
    assert _plan(1, 1, max_steps=5).total_steps == 5
    epoch = [i for step in range(3) for batch in plan.micro_batches(step, 0) for i in batch]
    assert sorted(epoch) == list(range(21))  # every row once per epoch
    assert plan.micro_batches(0, 0) != plan.micro_batches(3, 0)  # reshuffled next epoch
    assert plan.micro_batches(3, 0) == _plan(1, 4, num_epochs=2.5).micro_batches(3, 0)  # seeded


def test_processes_split_the_single_process_step() -> None:
    single, pair = _plan(1, 4), _plan(2, 2)
    assert single.total_steps == pair.total_steps
    for step in range(single.total_steps):
        together = sorted(map(tuple, single.micro_batches(step, 0)))
        split = sorted(map(tuple, pair.micro_batches(step, 0) + pair.micro_batches(step, 1)))
        assert together == split
