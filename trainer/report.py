"""What a run shows and leaves behind: the progress bar, the loss curve PNG and the eval report files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from loraplex.trainer.evaluate import EvalReport

LOSS_CURVE = "loss_curve.png"
EVAL_JSON = "eval_report.json"
EVAL_MARKDOWN = "eval_report.md"


class ProgressBar:
    """tqdm bar over optimizer steps; postfix: loss, learning rate, tokens/s (ETA is tqdm's)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self._started = time.monotonic()
        self._tokens = 0

    def update(self, loss: float, lr: float, tokens: int) -> float:
        """Advances one step; returns tokens/s since the bar started."""
        self._tokens += tokens
        rate = self._tokens / max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", refresh=False)
        self._bar.update(1)
        return rate

    def write(self, message: str) -> None:
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()


def plot_loss(history: list[dict[str, float]], path: Path) -> None:
    """Training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history]
    axes.plot(steps, [h["loss"] for h in history], label="train loss", linewidth=1)
    evals = [h for h in history if not math.isnan(h.get("val_loss", math.nan))]
    if evals:
        axes.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_eval_report(directory: Path, report: EvalReport, extra: dict[str, Any] | None = None) -> None:
    (directory / EVAL_JSON).write_text(json.dumps(report.as_dict() | (extra or {}), indent=2) + "\n")
    (directory / EVAL_MARKDOWN).write_text("# Evaluation: base vs adapter\n\n" + report.markdown())
