"""Engine benchmark: one workload through loraplex (mixed adapters, no adapters) and PEFT, side by side.

Workload: requests over distinct adapters, Poisson arrivals, prompt and output lengths drawn uniformly, every
request generating exactly its ``max_new_tokens`` (EOS ignored, so all systems do the same work). Systems:

  (a) loraplex, each request with its own adapter        (b) loraplex, the same requests on the base alone
  (c) PEFT ``generate(adapter_names=…)`` in arrival-order static batches of up to 32
  (d) PEFT one adapter at a time (``set_adapter``, that adapter's requests batched)

for two adapter shapes: *light* (rank 8 on q,v) and *heavy* (rank 16 on all linear layers). Then the same loraplex
workload with many more distinct adapters than device slots, against a few adapters (the cache under churn), and
the resident memory of the server (float32 and nf4 base). Prints tokens/s and the ratios measured in this one run.

    python loadtests/bench_engine.py --quick              # < 3 minutes on 2 cores
    python loadtests/bench_engine.py --json results.json  # the full workload (64 requests, 32 adapters)
    python loadtests/bench_engine.py --max-running 64 --rate 1000 ...  # 64 requests in flight at once (GPU proof)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*: this file's siblings

from loadtests.synthetic_adapters import QV, write_adapter  # noqa: E402
from loraplex.server.config import ModelSettings, default_cache_dir, load_settings  # noqa: E402
from loraplex.server.core.shape import TARGET_MODULES  # noqa: E402
from loraplex.server.core.types import GenerationRequest, SamplingParams  # noqa: E402
from loraplex.server.engine.engine import Engine  # noqa: E402
from loraplex.server.model.loader import LoadedBase, load_base  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "light": {"rank": 8, "targets": QV},
    "heavy": {"rank": 16, "targets": TARGET_MODULES},
}


@dataclass(frozen=True)
class Job:
    arrival: float  # seconds after the start
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    adapter: str


@dataclass(frozen=True)
class Workload:
    requests: int
    adapters: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    rate: float  # Poisson arrival rate, requests/s

    def jobs(self, vocab: int, adapter_ids: Sequence[str], seed: int = 0) -> list[Job]:
        rng = random.Random(seed)
        clock = 0.0
        order = [adapter_ids[i % len(adapter_ids)] for i in range(self.requests)]
        rng.shuffle(order)
        jobs = []
        for adapter in order:
            clock += rng.expovariate(self.rate)
            length = rng.randint(*self.prompt_range)
            prompt = tuple(rng.randrange(100, vocab) for _ in range(length))
            jobs.append(Job(clock, prompt, rng.randint(*self.output_range), adapter))
        return jobs


@dataclass
class Result:
    system: str
    shape: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def adapter_dir(base: LoadedBase, shape: str, count: int) -> tuple[Path, list[str]]:
    """Synthetic adapters for this base, written once into the cache and reused by later runs."""
    spec = SHAPES[shape]
    root = default_cache_dir() / "bench-adapters" / f"{base.fingerprint[7:19]}-{shape}"
    names = [f"{shape}-{i:04d}" for i in range(count)]
    for seed, name in enumerate(names):
        if not (root / name / "adapter_model.safetensors").exists():
            write_adapter(root / name, base.shape, spec["rank"], spec["targets"], seed=seed, strength=1.0)
    return root, names


def run_loraplex(engine: Engine, jobs: Sequence[Job], use_adapters: bool, tag: str) -> float:
    """Submits each job at its arrival time; returns seconds from the first arrival to the last finish."""

    async def one(index: int, job: Job, start: float) -> None:
        await asyncio.sleep(max(0.0, start + job.arrival - time.perf_counter()))
        request = GenerationRequest(
            request_id=f"{tag}-{index}",
            prompt_token_ids=job.prompt_ids,
            adapter_id=job.adapter if use_adapters else None,
            sampling=SamplingParams(max_new_tokens=job.max_new_tokens, ignore_eos=True),
        )
        async for _ in engine.generate(request):
            pass

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(i, job, start) for i, job in enumerate(jobs)))
        return time.perf_counter() - start - jobs[0].arrival

    return asyncio.run(main())


def _peft_generate(model: Any, batch: Sequence[Job], adapter_names: list[str] | None, pad_id: int) -> None:
    width = max(len(job.prompt_ids) for job in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, job in enumerate(batch):  # left padding, as decoder-only generation needs
        ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
        mask[row, width - len(job.prompt_ids) :] = 1
    new = max(job.max_new_tokens for job in batch)
    kwargs: dict[str, Any] = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.no_grad():
        model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
            **kwargs,
        )


def run_peft_mixed(model: Any, jobs: Sequence[Job], pad_id: int, batch_size: int = 32) -> float:
    """Arrival-order static batches: a batch starts when its last request has arrived and the last batch is done."""
    clock = jobs[0].arrival
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        clock = max(clock, batch[-1].arrival)
        began = time.perf_counter()
        _peft_generate(model, batch, [job.adapter for job in batch], pad_id)
        clock += time.perf_counter() - began
    return clock - jobs[0].arrival


def run_peft_single(model: Any, jobs: Sequence[Job], pad_id: int, batch_size: int = 32) -> float:
    """One adapter at a time, in order of first arrival; that adapter's requests batched together."""
    by_adapter: dict[str, list[Job]] = {}
    for job in jobs:
        by_adapter.setdefault(job.adapter, []).append(job)
    clock = jobs[0].arrival
    for adapter, group in by_adapter.items():
        model.set_adapter(adapter)
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            clock = max(clock, batch[-1].arrival)
            began = time.perf_counter()
            _peft_generate(model, batch, None, pad_id)
            clock += time.perf_counter() - began
    return clock - jobs[0].arrival


def load_peft(base: LoadedBase, root: Path, names: Sequence[str]) -> Any:
    """PEFT wrapped around the engine's own base model (same weights, same quantization), every adapter loaded.
    Call ``.unload()`` on the result afterwards: it takes PEFT's layers out of the base model again."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(base.model, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    return peft.eval()


def make_engine(base: LoadedBase, root: Path, slots: int, max_running: int) -> Engine:
    settings = load_settings(
        environ={},
        overrides={
            "adapters": {"roots": [str(root)], "device_slots": slots, "device_bytes": 16 << 30},
            "engine": {"max_running": max_running, "max_batch_tokens": 1024, "max_queue": 4096},
        },
    )
    engine = Engine(base, settings)
    engine.start()
    return engine


def warm_up(engine: Engine, adapters: Sequence[str]) -> None:
    for name in adapters:
        engine.load_adapter(name).result()
    jobs = [Job(0.0, tuple(range(200, 232)), 4, name) for name in adapters[:4]]
    run_loraplex(engine, jobs, use_adapters=True, tag="warm")


def bench_shape(
    base: LoadedBase, shape: str, workload: Workload, skip_peft: bool, seed: int, max_running: int
) -> list[Result]:
    root, names = adapter_dir(base, shape, workload.adapters)
    jobs = workload.jobs(base.shape.vocab_size, names, seed)
    tokens = sum(job.max_new_tokens for job in jobs)
    engine = make_engine(base, root, slots=max(workload.adapters, 8), max_running=max_running)
    try:
        warm_up(engine, names)
        results = [
            Result("loraplex-mixed", shape, tokens, run_loraplex(engine, jobs, True, f"{shape}-a")),
            Result("loraplex-base", shape, tokens, run_loraplex(engine, jobs, False, f"{shape}-b")),
        ]
    finally:
        engine.stop()
    if not skip_peft:
        peft = load_peft(base, root, names)
        pad_id = int(base.tokenizer.pad_token_id or 0)
        _peft_generate(peft, jobs[:2], [jobs[0].adapter, jobs[1].adapter], pad_id)  # warm-up
        results.append(Result("peft-mixed-static", shape, tokens, run_peft_mixed(peft, jobs, pad_id)))
        results.append(Result("peft-one-adapter-at-a-time", shape, tokens, run_peft_single(peft, jobs, pad_id)))
        peft.unload()
    return results


def bench_cache_churn(
    base: LoadedBase, workload: Workload, many: int, few: int, slots: int, seed: int, max_running: int
) -> dict[str, Any]:
    """The same requests over ``many`` distinct adapters through ``slots`` device slots, against ``few``."""
    root, names = adapter_dir(base, "light", many)
    out: dict[str, Any] = {"slots": slots}
    for label, count in (("few", few), ("many", many)):
        chosen = names[:count]
        churn = Workload(
            max(workload.requests, count), count, workload.prompt_range, workload.output_range, workload.rate
        )
        jobs = churn.jobs(base.shape.vocab_size, chosen, seed)
        engine = make_engine(base, root, slots=slots, max_running=max_running)
        try:
            warm_up(engine, chosen[:slots])
            seconds = run_loraplex(engine, jobs, True, f"churn-{label}")
        finally:
            engine.stop()
        out[label] = {
            "adapters": count,
            "requests": len(jobs),
            "tokens_per_s": sum(j.max_new_tokens for j in jobs) / seconds,
        }
    out["ratio_many_over_few"] = out["many"]["tokens_per_s"] / out["few"]["tokens_per_s"]
    return out


_RSS_PROBE = """
import sys, torch
from loraplex.server.config import load_settings
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import load_base
settings = load_settings(environ={}, overrides={"model": {"base_model": sys.argv[1], "quantization": sys.argv[2]}})
engine = Engine(load_base(settings.model), settings)
rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
print(rss * 1024, engine.kv.nbytes)
"""


def resident_memory(base_dir: Path) -> dict[str, Any]:
    """RSS of a fresh process holding the base and an engine (KV cache allocated), per quantization."""
    out = {}
    for quantization in ("none", "nf4"):
        probe = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(base_dir), quantization], check=True, capture_output=True, text=True
        )
        rss, kv = (int(v) for v in probe.stdout.split()[-2:])
        out[quantization] = {"rss_mib": rss / 2**20, "kv_cache_mib": kv / 2**20}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small workload (< 3 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--base-model", default="embedded")
    parser.add_argument("--shapes", default="light,heavy")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-churn", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, help="override the workload's request count")
    parser.add_argument("--adapters", type=int, help="override the workload's distinct adapter count")
    parser.add_argument("--rate", type=float, help="override the workload's arrival rate (requests/s)")
    parser.add_argument("--max-running", type=int, default=32, help="engine.max_running: sequences in one batch")
    args = parser.parse_args()

    if args.quick:
        workload = Workload(requests=12, adapters=6, prompt_range=(16, 48), output_range=(8, 24), rate=50.0)
        churn = dict(many=48, few=4, slots=8)
    else:
        workload = Workload(requests=64, adapters=32, prompt_range=(16, 256), output_range=(16, 128), rate=20.0)
        churn = dict(many=512, few=8, slots=32)
    workload = replace(
        workload,
        requests=args.requests or workload.requests,
        adapters=args.adapters or workload.adapters,
        rate=args.rate or workload.rate,
    )
    base = load_base(ModelSettings(base_model=args.base_model))
    print(
        f"base {base.name} on {base.device} ({base.dtype}, {base.quantization}), torch threads "
        f"{torch.get_num_threads()}; workload {asdict(workload)}",
        flush=True,
    )
    report: dict[str, Any] = {
        "workload": asdict(workload),
        "max_running": args.max_running,
        "device": str(base.device),
        "shapes": {},
    }
    for shape in args.shapes.split(","):
        results = bench_shape(base, shape, workload, args.skip_peft, args.seed, args.max_running)
        by = {r.system: r.tokens_per_s for r in results}
        ratios = {"a/b": by["loraplex-mixed"] / by["loraplex-base"]}
        if not args.skip_peft:
            ratios["a/c"] = by["loraplex-mixed"] / by["peft-mixed-static"]
            ratios["a/d"] = by["loraplex-mixed"] / by["peft-one-adapter-at-a-time"]
        report["shapes"][shape] = {"tokens_per_s": by, "ratios": ratios}
        print(f"\n[{shape}] {SHAPES[shape]}")
        for system, value in by.items():
            print(f"  {system:28s} {value:8.1f} tokens/s")
        print("  ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()), flush=True)
    if not args.skip_churn:
        report["cache_churn"] = bench_cache_churn(
            base, workload, churn["many"], churn["few"], churn["slots"], args.seed, args.max_running
        )
        c = report["cache_churn"]
        print(
            f"\n[cache churn] {c['many']['adapters']} adapters through {c['slots']} slots: "
            f"{c['many']['tokens_per_s']:.1f} tokens/s vs {c['few']['adapters']} adapters: "
            f"{c['few']['tokens_per_s']:.1f} tokens/s -> ratio {c['ratio_many_over_few']:.2f}",
            flush=True,
        )
    if not args.skip_memory:
        report["resident_memory"] = resident_memory(base.model_dir)
        for quantization, values in report["resident_memory"].items():
            print(
                f"[memory] base {quantization}: RSS {values['rss_mib']:.0f} MiB "
                f"(of which KV cache {values['kv_cache_mib']:.0f} MiB)"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
