"""``python -m loraplex.trainer.demo [ID ...]``: regenerates the demo data and trains the demo adapters.

Each ``trainer/demo/<adapter-id>.yaml`` is a plain ``loraplex-train`` config; its adapter is written to
``adapters/<adapter-id>/`` (checkpoints removed) and a table of held-out exact match, base vs adapter, is printed
and written to ``trainer/demo/RESULTS.md``. Everything is seeded, so a rebuild gives the same adapters on the
same machine and library versions.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from loraplex.trainer.checkpoint import CHECKPOINTS
from loraplex.trainer.config import load_config
from loraplex.trainer.demo.tasks import TASKS, write_task_data
from loraplex.trainer.train import train

HERE = Path(__file__).resolve().parent
TRAIN_EXAMPLES = 800
TEST_EXAMPLES = 100


def _near(path: Path) -> Path:
    """``path`` relative to the working directory when inside it (manifests then record portable paths)."""
    relative = os.path.relpath(path, Path.cwd())
    return Path(relative) if not relative.startswith("..") else path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loraplex.trainer.demo", description=__doc__)
    parser.add_argument("ids", nargs="*", help="adapter ids to build (default: all configs)")
    parser.add_argument("--adapters", type=Path, default=Path("adapters"), help="adapter root to write into")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for task in TASKS.values():
        write_task_data(task, HERE / "data" / task.name, TRAIN_EXAMPLES, TEST_EXAMPLES)
    configs = sorted(HERE.glob("*.yaml"))
    unknown = set(args.ids) - {c.stem for c in configs}
    if unknown:
        parser.error(f"no demo config for {sorted(unknown)}; known: {[c.stem for c in configs]}")
    rows = []
    for path in configs:
        if args.ids and path.stem not in args.ids:
            continue
        output = args.adapters / path.stem
        config = load_config(_near(path), {"output_dir": str(output)})
        result = train(config)
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
        assert result.eval is not None
        base, adapter = result.eval.base["exact_match"], result.eval.adapter["exact_match"]
        rows.append(
            f"| `{path.stem}` | {result.eval.num_generated} | {100 * base:.0f} | {100 * adapter:.0f} | "
            f"{100 * (adapter - base):+.0f} |"
        )
    table = "\n".join(
        [
            "| adapter | held-out examples | base EM % | adapter EM % | change (points) |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    print(table)
    if not args.ids:
        (HERE / "RESULTS.md").write_text("# Demo adapters: held-out exact match\n\n" + table + "\n")


if __name__ == "__main__":
    main()
