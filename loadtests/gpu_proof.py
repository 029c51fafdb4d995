"""Issue 14's proof on a GPU machine in one command (under 10 minutes): every part in its own process with its own
time budget (killed with its process group when it overruns), a failing part recorded and the next one run, and one
summary JSON with the three proof figures and pass/fail per figure. ``OUT`` gets only the JSON reports (the device
tool brings back at most 8 files); logs, wheels and the base live in ``--work``.

Parts: install carried wheels (a ``.whl`` folder) into ``WORK/site``, link the checkout's packages there (the device
image has no editable install), print the device, ``pytest -m gpu`` over the test files that carry the marker,
bench_decode_roofline.py (8B shape), a random 8B base written once for bench_engine.py (both shapes, PEFT, churn
and memory skipped), bench_lora_ops.py on CUDA, and bench_quantized_base.py where it exists. Standard library only:
this process imports no torch, so it never hangs on the device.

    python3 loadtests/gpu_proof.py --out "$OUT"            # on the GPU machine (make gpu-proof)
    python3 loadtests/gpu_proof.py --out /tmp/p --cpu-smoke  # every part at tiny size on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The goals: step / floor, light and heavy a/b, base tok/s (10x the 181.8 of BENCHMARKS.md's H100 run).
GOALS = {"roofline_ratio_max": 1.5, "light_ab_min": 0.9, "heavy_ab_min": 0.8, "base_tokens_per_s_min": 1818.0}
PACKAGES = {"server": "server", "trainer": "trainer", "client": "clients/python", "proto": "protos/gen"}


@dataclass
class Part:
    name: str
    command: list[str]
    budget_s: float
    json_out: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)


def run_part(part: Part, logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """Runs one part, its output in ``logs/<name>.log``; killed with its process group past its budget."""
    log = logs / f"{part.name}.log"
    started = time.monotonic()
    print(f"== {part.name} (budget {part.budget_s:.0f} s): {' '.join(part.command)}", flush=True)
    with log.open("w") as sink:
        try:
            proc = subprocess.Popen(
                part.command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            return {"status": "error", "error": f"could not start: {exc}", "seconds": 0.0}
        try:
            rc = proc.wait(timeout=part.budget_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    seconds = time.monotonic() - started
    tail = log.read_text(errors="replace")[-1500:]
    print(tail, flush=True)
    print(f"== {part.name}: {status} (rc {rc}) in {seconds:.0f} s", flush=True)
    result: dict[str, Any] = {"status": status, "rc": rc, "seconds": round(seconds, 1)}
    if part.json_out is not None and part.json_out.exists():
        try:
            result["report"] = json.loads(part.json_out.read_text())
        except json.JSONDecodeError as exc:
            result["report_error"] = str(exc)
    return result


def link_packages(site: Path) -> None:
    """``site/loraplex/<pkg>`` → the checkout's folders, as the editable install maps them."""
    root = site / "loraplex"
    root.mkdir(parents=True, exist_ok=True)
    for name, folder in PACKAGES.items():
        link = root / name
        if not link.exists():
            link.symlink_to(REPO / folder, target_is_directory=True)


def gpu_test_files() -> list[str]:
    return sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("test_*.py")
        if "mark.gpu" in path.read_text(errors="replace")
    )


def parts(args: argparse.Namespace, out: Path, work: Path) -> list[Part]:
    py = sys.executable
    smoke = args.cpu_smoke
    wheels = REPO / ".whl"
    site = work / "site"
    listed: list[Part] = []
    if wheels.is_dir() and any(wheels.glob("*.whl")):
        install = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        install += ["--upgrade", "--target", str(site), *sorted(str(w) for w in wheels.glob("*.whl"))]
        listed.append(Part("wheels", install, 120))
    probe = (
        "import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', "
        "torch.version.cuda, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name() "
        "if torch.cuda.is_available() else 'cpu'); import loraplex.server.engine.engine; print('loraplex imports ok')"
    )
    listed.append(Part("device", [py, "-c", probe], 120))
    if not smoke:
        listed.append(Part("nvidia-smi", ["nvidia-smi"], 30))
    tests = gpu_test_files()
    listed.append(
        Part("pytest-gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests], args.test_budget)
    )
    roofline = out / "roofline.json"
    shape = ["--shape", "tiny", "--device", "cpu", "--batch", "8", "--adapters", "8"] if smoke else ["--shape", "8b"]
    roof_cmd = [py, "loadtests/bench_decode_roofline.py", *shape, "--json", str(roofline)]
    roof_cmd += [f"--set={s}" for s in args.set]
    listed.append(Part("roofline", roof_cmd, 60 if smoke else args.roofline_budget, roofline))
    base_dir = work / ("base-tiny" if smoke else "base-8b")
    preset = ["--preset", "tiny", "--dtype", "float32"] if smoke else ["--preset", "llama-8b", "--dtype", "bfloat16"]
    device = ["--device", "cpu" if smoke else "cuda"]
    listed.append(Part("random-base", [py, "-m", "loadtests.random_model", str(base_dir), *preset, *device], 240))
    engine_json = out / "bench_engine.json"
    # the base figure is "64 concurrent requests": all 64 arrive at once into a 64-row batch
    sizes = ["--quick"] if smoke else ["--requests", "64", "--adapters", "32", "--max-running", "64", "--rate", "1000"]
    engine_cmd = [py, "loadtests/bench_engine.py", "--base-model", str(base_dir), *sizes, "--json", str(engine_json)]
    engine_cmd += ["--skip-peft", "--skip-churn", "--skip-memory"]
    listed.append(Part("bench-engine", engine_cmd, 60 if smoke else args.engine_budget, engine_json))
    ops = ["--tokens", "8,32"] if smoke else ["--device", "cuda", "--dtype", "bfloat16", "--fan-in", "4096"]
    ops += [] if smoke else ["--fan-out", "14336", "--tokens", "8,32,64,128,512,2048", "--adapters", "64"]
    listed.append(Part("lora-ops", [py, "loadtests/bench_lora_ops.py", *ops], 60 if smoke else 90))
    quantized = REPO / "loadtests" / "bench_quantized_base.py"
    if quantized.exists():
        q_cmd = [py, str(quantized.relative_to(REPO)), *(["--help"] if smoke else [])]
        listed.append(Part("quantized-base", q_cmd, 60 if smoke else args.quantized_budget))
    return listed


def figure(value: float | None, goal: float, at_most: bool, note: str) -> dict[str, Any]:
    if value is None:
        return {"value": None, "goal": goal, "passed": False, "note": note + " (not measured: its part failed)"}
    passed = value <= goal if at_most else value >= goal
    return {"value": value, "goal": goal, "passed": passed, "note": note}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The three proof figures (four values) from the parts' reports, pass/fail each."""
    roof = results.get("roofline", {}).get("report") or {}
    shapes = (results.get("bench-engine", {}).get("report") or {}).get("shapes", {})

    def ab(shape: str) -> float | None:
        value = shapes.get(shape, {}).get("ratios", {}).get("a/b")
        return float(value) if value is not None else None

    base = shapes.get("light", {}).get("tokens_per_s", {}).get("loraplex-base")
    figures = {
        "roofline_step_over_floor": figure(
            roof.get("ratio"), GOALS["roofline_ratio_max"], True, "decode step / floor, batch 64, 64 adapters"
        ),
        "light_a_over_b": figure(ab("light"), GOALS["light_ab_min"], False, "bench_engine light (a)/(b)"),
        "heavy_a_over_b": figure(ab("heavy"), GOALS["heavy_ab_min"], False, "bench_engine heavy (a)/(b)"),
        "base_tokens_per_s": figure(
            float(base) if base is not None else None,
            GOALS["base_tokens_per_s_min"],
            False,
            "bench_engine light (b): base alone, 64 requests in flight at once",
        ),
    }
    return {
        "figures": figures,
        "all_passed": all(f["passed"] for f in figures.values()),
        "parts": {name: {k: v for k, v in r.items() if k != "report"} for name, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-proof-out")))
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/loraplex-proof"), help="installed wheels, the 8B base, the logs"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at tiny size on CPU")
    parser.add_argument("--test-budget", type=float, default=150)
    parser.add_argument("--roofline-budget", type=float, default=150)
    parser.add_argument("--engine-budget", type=float, default=180)
    parser.add_argument("--quantized-budget", type=float, default=90)
    parser.add_argument("--set", action="append", default=[], help="engine setting for the roofline run (repeat)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    work = args.work.resolve()
    logs = work / "logs"
    for folder in (out, logs):
        folder.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    link_packages(site)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), env.get("PYTHONPATH", "")) if p)
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    results: dict[str, dict[str, Any]] = {}
    for part in parts(args, out, work):
        results[part.name] = run_part(part, logs, env)
    summary = summarize(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nissue 14 proof figures:")
    for name, f in summary["figures"].items():
        value = "unmeasured" if f["value"] is None else f"{f['value']:.3f}"
        print(f"  {name:26s} {value:>10s}  goal {f['goal']}  {'PASS' if f['passed'] else 'FAIL'}  ({f['note']})")
    for name, r in summary["parts"].items():
        print(f"  part {name:16s} {r['status']:8s} {r['seconds']:6.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
