"""The full resilience run (``make resilience``): every scenario of ``tests/resilience`` at full size, then one table.

Sets ``LORAPLEX_RESILIENCE_FULL=1`` (full-size variants: 60 s of 4× overload, 200 churn cycles, ...) and
``LORAPLEX_RESILIENCE_FIGURES`` to a temporary file that each test appends its figures to
(``tests/support/resilience.py``), runs ``pytest -m resilience tests/resilience``, and prints scenario, figure, goal
and pass/fail for every figure, then the failing tests. Exits non-zero when a test failed or a figure missed its
goal.

    .venv/bin/python loadtests/run_resilience.py [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    1: "overload",
    2: "hot-swap churn",
    3: "fuzzing",
    4: "bad adapter files",
    5: "faults",
    6: "shutdown",
    7: "tenancy and auth",
    8: "fair share",
}
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def read_figures(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def table(figures: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the figures, in scenario order (stable within a scenario)."""
    rows = ["| scenario | figure | value | goal | result |", "| --- | --- | --- | --- | --- |"]
    for item in sorted(figures, key=lambda f: int(f["scenario"])):
        scenario = f"{item['scenario']} {SCENARIOS.get(int(item['scenario']), '')}".strip()
        cells = [scenario, item["name"], item["figure"], item["goal"], "pass" if item["passed"] else "FAIL"]
        rows.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraplex-resilience-") as scratch:
        figures_path = Path(scratch) / "figures.jsonl"
        env = {**os.environ, "LORAPLEX_RESILIENCE_FULL": "1", "LORAPLEX_RESILIENCE_FIGURES": str(figures_path)}
        command = [sys.executable, "-m", "pytest", "-m", "resilience", "-rfE", "tests/resilience", *args.pytest_args]
        print("$", " ".join(command), flush=True)
        output: list[str] = []
        with subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:  # shown as it runs; kept to find the failing tests
                sys.stdout.write(line)
                output.append(line)
        returncode = process.returncode
        figures = read_figures(figures_path)
    failing_tests = sorted(set(_FAILED.findall("".join(output))))
    missed = [f for f in figures if not f["passed"]]
    print("\n## Resilience figures\n")
    print(table(figures) if figures else "(no figures recorded)")
    if failing_tests:
        print("\nFailing tests:\n" + "\n".join(f"- {name}" for name in failing_tests))
    print(f"\npytest exit status {returncode}; {len(figures)} figures, {len(missed)} missed their goal")
    return 1 if returncode != 0 or missed else 0


if __name__ == "__main__":
    sys.exit(main())
