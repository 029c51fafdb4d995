"""gpu_proof: the summary's figures and verdicts from the parts' reports, and (slow) the whole script at tiny size
on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loadtests import gpu_proof


def _engine(light_ab: float, heavy_ab: float, base: float) -> dict:
    return {
        "shapes": {
            "light": {"ratios": {"a/b": light_ab}, "tokens_per_s": {"loraplex-base": base}},
            "heavy": {"ratios": {"a/b": heavy_ab}, "tokens_per_s": {"loraplex-base": base}},
        }
    }


def test_summary_passes_and_fails_per_figure() -> None:
    results = {
        "roofline": {"status": "ok", "seconds": 1.0, "report": {"ratio": 1.4}},
        "bench-engine": {"status": "ok", "seconds": 1.0, "report": _engine(0.95, 0.79, 2000.0)},
    }
    summary = gpu_proof.summarize(results)
    passed = {name: f["passed"] for name, f in summary["figures"].items()}
    assert passed == {
        "roofline_step_over_floor": True,
        "light_a_over_b": True,
        "heavy_a_over_b": False,
        "base_tokens_per_s": True,
    }
    assert not summary["all_passed"]
    assert "report" not in summary["parts"]["roofline"]


def test_a_failed_part_is_unmeasured_not_passed() -> None:
    summary = gpu_proof.summarize({"roofline": {"status": "timeout", "seconds": 150.0}})
    assert all(f["value"] is None and not f["passed"] for f in summary["figures"].values())
    assert summary["parts"]["roofline"]["status"] == "timeout"


def test_a_part_past_its_budget_is_killed(tmp_path: Path) -> None:
    part = gpu_proof.Part("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], 1.0)
    result = gpu_proof.run_part(part, tmp_path, {})
    assert result["status"] == "timeout" and result["seconds"] < 10


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path: Path) -> None:
    assert gpu_proof.main(["--out", str(tmp_path), "--work", str(tmp_path / "work"), "--cpu-smoke"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["status"] for r in summary["parts"].values()} == {"ok"}, summary["parts"]
    assert all(f["value"] is not None for f in summary["figures"].values())
