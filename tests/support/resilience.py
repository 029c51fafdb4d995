"""Figures of the resilience scenarios: what each test measured, against its goal.

A test calls :func:`record` with the scenario's number and name, the figure and whether it met its goal. When
``LORAPLEX_RESILIENCE_FIGURES`` names a file (``loadtests/run_resilience.py`` sets it), each figure is appended to it
as one JSON line, so the full run can print a table; otherwise recording does nothing. ``full_run`` tells a test to
use the full-size variant of its scenario (``LORAPLEX_RESILIENCE_FULL=1``) instead of the quick one of the suite;
``rss_bytes`` reads a server's memory; ``fuzz_settings`` are the fuzzers' hypothesis settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

FIGURES_ENV = "LORAPLEX_RESILIENCE_FIGURES"
FULL_ENV = "LORAPLEX_RESILIENCE_FULL"


def full_run() -> bool:
    """True when the full-size scenarios were asked for (the ``make resilience`` run), False in the test suite."""
    return os.environ.get(FULL_ENV) == "1"


def record(scenario: int, name: str, figure: str, goal: str, passed: bool) -> None:
    """Appends one figure of scenario ``scenario`` to the figures file: 1-7 as numbered in the resilience issue, 8
    the fair-share scenario of issue 17."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    line = {"scenario": scenario, "name": name, "figure": figure, "goal": goal, "passed": passed}
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """A memory figure of process ``pid`` from /proc (VmRSS now, VmHWM the peak so far), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} in /proc/{pid}/status")


def fuzz_settings(examples: int) -> settings:
    """The fuzzers' hypothesis settings: ``examples`` draws, the same ones every run (derandomized, no example
    database, generation only: no shrinking), no deadline and no health check (a draw may be slow or mostly junk)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
