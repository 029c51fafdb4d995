"""Decode step time against the memory/compute floor: batch 64, 64 distinct rank-16 adapters on every linear layer
(the heavy shape), through the engine itself (scheduler, batch building, forward pass, sampler: what users run).

The floor of one decode step is the larger of two times (loadtests/BENCHMARKS.md, issue 14):

- bytes ÷ copy bandwidth: the weights read once (the whole model except the embedding table, of which only the
  batch's rows are read), the KV cache read (every sequence's context, every layer) and written (one token per
  sequence), and the LoRA weights of the step's distinct adapters at their own rank; the bandwidth is a large
  device-to-device copy, timed, counting the bytes read plus the bytes written;
- FLOPs ÷ matmul rate: 2·in·out per row for every linear, the LM head for the sampled rows, 2·r·(in + out) per row
  for each LoRA module, 4·heads·head_dim per attended token per layer (QKᵀ and PV); the rate is a large square
  matmul in the model's dtype, timed.

Activations and logits are left out of the bytes (they make the floor lower, so the ratio stricter). The step time
is the median interval between consecutive full decode steps (every row one sequence's next token, all ``batch``
sequences in the step) after ``warmup`` such steps; the engine's own per-step time (batch built, forward, sampled)
is reported beside it. Prints every term, the ratio and writes JSON.

    python loadtests/bench_decode_roofline.py --shape 8b --json roofline.json   # on a GPU (random 8B base, bf16)
    python loadtests/bench_decode_roofline.py --shape tiny                      # the same arithmetic on CPU, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*: this file's siblings

from loadtests.random_base import random_base  # noqa: E402
from loadtests.synthetic_adapters import ALL_LINEAR, write_adapter  # noqa: E402
from loraplex.server.config import load_settings  # noqa: E402
from loraplex.server.core.events import EngineListener  # noqa: E402
from loraplex.server.core.shape import ModelShape  # noqa: E402
from loraplex.server.core.types import GenerationRequest, SamplingParams  # noqa: E402
from loraplex.server.engine.engine import Engine, describe  # noqa: E402
from loraplex.server.lora.pool import PoolKey, SlotPool, rank_bucket  # noqa: E402
from loraplex.server.model.loader import LoadedBase  # noqa: E402

TARGET_RATIO = 1.5
# Per shape: the random base preset, the prompt length, the full decode steps skipped and measured, and the sizes of
# the two ceiling measurements (copy bytes, square matmul side): several times the L2 on a GPU, small on CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny", "prompt": 16, "warmup": 3, "steps": 8, "copy_mib": 64, "matmul_n": 512},
    "8b": {"preset": "llama-8b", "prompt": 128, "warmup": 8, "steps": 32, "copy_mib": 2048, "matmul_n": 8192},
}


# ------------------------------------------------------------------------------------------------ the ceilings


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls: CUDA events around each call on a GPU, else a host clock."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 20) -> dict[str, float]:
    """A device-to-device copy of ``mib`` MiB of random data; bytes moved = read + written."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    moved = 2 * src.nbytes
    return {"bytes_moved": moved, "seconds": seconds, "bytes_per_s": moved / seconds}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> dict[str, float]:
    """An ``n``×``n``×``n`` matmul of random data in ``dtype``: 2n³ FLOPs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats)
    flops = 2 * n**3
    return {"n": n, "flops": flops, "seconds": seconds, "flops_per_s": flops / seconds}


# ------------------------------------------------------------------------------------------------ the counts


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter (shared ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass(frozen=True)
class StepWork:
    """What one decode step over ``rows`` sequences must read and compute."""

    rows: int
    adapters: int
    rank: int
    targets: tuple[str, ...]
    kv_tokens: float  # attended context tokens, all sequences together (mean over the measured steps)


def step_counts(base: LoadedBase, work: StepWork, lora_element_size: int) -> dict[str, float]:
    """Bytes and FLOPs of one decode step (see the module docstring for what is counted)."""
    shape: ModelShape = base.shape
    model = base.model
    embedding = model.get_input_embeddings().weight
    tied = embedding.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    total = parameter_bytes(model)
    table = embedding.numel() * embedding.element_size()
    rows_read = 0 if tied else work.rows * shape.hidden_size * embedding.element_size()
    weights_read = total if tied else total - table + rows_read
    kv_per_token = shape.kv_bytes_per_token(torch.empty((), dtype=base.dtype).element_size())
    kv_bytes = (work.kv_tokens + work.rows) * kv_per_token
    key = PoolKey(work.rank, tuple(work.targets), dora=False)
    lora_per_adapter = SlotPool.bytes_per_slot(key, shape, lora_element_size)
    lora_bytes = work.adapters * lora_per_adapter
    dims = [shape.module_dims(m) for m in ALL_LINEAR]
    linear = 2 * work.rows * shape.num_layers * sum(i * o for i, o in dims)
    lm_head = 2 * work.rows * shape.hidden_size * shape.vocab_size
    lora = 2 * work.rows * work.rank * shape.num_layers * sum(sum(shape.module_dims(m)) for m in work.targets)
    attention = 4 * shape.num_heads * shape.head_dim * work.kv_tokens * shape.num_layers
    return {
        "weight_bytes_total": total,
        "embedding_table_bytes": table,
        "embedding_tied": tied,
        "weight_bytes_read": weights_read,
        "kv_tokens_read": work.kv_tokens,
        "kv_tokens_written": work.rows,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes": kv_bytes,
        "lora_bytes_per_adapter": lora_per_adapter,
        "lora_bytes": lora_bytes,
        "bytes_per_step": weights_read + kv_bytes + lora_bytes,
        "flops_linear": linear,
        "flops_lm_head": lm_head,
        "flops_lora": lora,
        "flops_attention": attention,
        "flops_per_step": linear + lm_head + lora + attention,
    }


def floor_of(counts: dict[str, float], bandwidth: float, rate: float) -> dict[str, Any]:
    memory = counts["bytes_per_step"] / bandwidth
    compute = counts["flops_per_step"] / rate
    return {
        "memory_seconds": memory,
        "compute_seconds": compute,
        "seconds": max(memory, compute),
        "bound": "memory" if memory >= compute else "compute",
    }


# --------------------------------------------------------------------------------------------- the measurement


@dataclass(frozen=True)
class StepRecord:
    ended: float  # perf_counter at the end of the step
    rows: int
    sequences: int
    adapters: int
    seconds: float  # the engine's own time for the step
    kv_tokens: int  # context tokens of the running sequences after the step


class StepRecorder(EngineListener):
    """Records every engine step, with the context the running sequences attended to (on the engine thread)."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.records: list[StepRecord] = []
        self._lock = threading.Lock()

    def step(self, rows: int, sequences: int, adapters: int, seconds: float) -> None:
        running = self.engine.scheduler.running if self.engine is not None else []
        record = StepRecord(
            time.perf_counter(), rows, sequences, adapters, seconds, sum(s.num_computed for s in running)
        )
        with self._lock:
            self.records.append(record)


def full_decode_steps(records: Sequence[StepRecord], batch: int) -> list[tuple[StepRecord, float]]:
    """(step, interval since the previous step) for steps of ``batch`` rows, one per sequence, whose previous step
    was one too (so the interval is a decode step's period, not a prefill's)."""
    out = []
    for previous, record in itertools.pairwise(records):
        full = record.rows == record.sequences == batch
        if full and previous.rows == previous.sequences == batch:
            out.append((record, record.ended - previous.ended))
    return out


def write_adapters(root: Path, shape: ModelShape, count: int, rank: int, dtype: torch.dtype) -> list[str]:
    names = [f"heavy-{i:04d}" for i in range(count)]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        list(
            pool.map(
                lambda item: write_adapter(root / item[1], shape, rank, ALL_LINEAR, seed=item[0], dtype=dtype),
                enumerate(names),
            )
        )
    return names


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` settings (value read as JSON where it parses, else a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: use section.key=value, e.g. engine.max_batch_tokens=2048")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


def measure(base: LoadedBase, args: argparse.Namespace, root: Path, names: list[str]) -> tuple[Engine, StepRecorder]:
    """Runs ``batch`` requests over the adapters through a started engine; returns it (stopped) and its records."""
    max_new = args.warmup + args.steps + math.ceil(args.batch * args.prompt / args.max_batch_tokens) + 4
    slot_bytes = SlotPool.bytes_per_slot(PoolKey(rank_bucket(args.rank), ALL_LINEAR, False), base.shape, 4)
    overrides: dict[str, dict[str, Any]] = {
        "adapters": {
            "roots": [str(root)],
            "device_slots": len(names),
            "device_bytes": len(names) * slot_bytes + (64 << 20),
            "host_bytes": 2 * len(names) * slot_bytes + (1 << 30),
        },
        "engine": {
            "max_running": args.batch,
            "max_queue": args.batch,
            "max_batch_tokens": args.max_batch_tokens,
            "kv_cache_tokens": max(4096, args.batch * (args.prompt + max_new + 32)),
            "prefix_cache": False,
        },
    }
    for section, values in parse_sets(args.set).items():
        overrides.setdefault(section, {}).update(values)
    recorder = StepRecorder()
    engine = Engine(base, load_settings(environ={}, overrides=overrides), recorder)
    recorder.engine = engine
    engine.start()
    try:
        for name in names:
            engine.load_adapter(name).result()
        rng = random.Random(args.seed)
        prompts = [tuple(rng.randrange(100, base.shape.vocab_size) for _ in range(args.prompt)) for _ in names]

        async def one(index: int) -> None:
            request = GenerationRequest(
                request_id=f"roofline-{index}",
                prompt_token_ids=prompts[index % len(prompts)],
                adapter_id=names[index % len(names)],
                sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True),
            )
            async for _ in engine.generate(request):
                pass

        async def run_all() -> None:
            await asyncio.gather(*(one(i) for i in range(args.batch)))

        asyncio.run(run_all())
    finally:
        engine.stop()
    return engine, recorder


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="roofline-", dir=args.work) as scratch:
        base = random_base(Path(scratch) / "base", preset["preset"], args.device, args.dtype, args.seed)
        device = base.device
        print(
            f"base random {preset['preset']} on {device} ({base.dtype}), built in {base.load_seconds:.1f} s; "
            f"{args.batch} requests over {args.adapters} adapters (rank {args.rank}, all linears)",
            flush=True,
        )
        bandwidth = copy_bandwidth(device, args.copy_mib or preset["copy_mib"])
        rate = matmul_rate(device, base.dtype, args.matmul_n or preset["matmul_n"])
        print(
            f"ceilings: copy {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (read + write), matmul "
            f"{rate['flops_per_s'] / 1e12:.2f} TFLOP/s ({base.dtype})",
            flush=True,
        )
        started = time.perf_counter()
        root = Path(scratch) / "adapters"
        names = write_adapters(root, base.shape, args.adapters, args.rank, base.dtype)
        print(f"{len(names)} adapters written in {time.perf_counter() - started:.1f} s", flush=True)
        engine, recorder = measure(base, args, root, names)
    steps = full_decode_steps(recorder.records, args.batch)
    report: dict[str, Any] = {
        "shape": args.shape,
        "preset": preset["preset"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(base.dtype).removeprefix("torch."),
        "batch": args.batch,
        "adapters": args.adapters,
        "rank": args.rank,
        "targets": list(ALL_LINEAR),
        "prompt_tokens": args.prompt,
        "engine": describe(engine),
        "settings": parse_sets(args.set),
        "ceilings": {"copy": bandwidth, "matmul": rate},
        "target_ratio": TARGET_RATIO,
    }
    if len(steps) < args.warmup + args.steps:
        report["error"] = (
            f"only {len(steps)} full decode steps of {args.batch} rows were seen (wanted {args.warmup + args.steps}); "
            f"steps: {[(r.rows, r.sequences) for r in recorder.records]}"
        )
        report["passed"] = False
        return report
    measured = steps[args.warmup : args.warmup + args.steps]
    periods = [interval for _, interval in measured]
    work = StepWork(
        rows=args.batch,
        adapters=min(args.adapters, args.batch),
        rank=args.rank,
        targets=ALL_LINEAR,
        kv_tokens=statistics.fmean(record.kv_tokens for record, _ in measured),
    )
    lora_size = engine.slots.dtype.itemsize
    counts = step_counts(base, work, lora_size)
    floor = floor_of(counts, bandwidth["bytes_per_s"], rate["flops_per_s"])
    step_seconds = statistics.median(periods)
    report |= {
        "lora_dtype": str(engine.slots.dtype).removeprefix("torch."),
        "counts": counts,
        "floor": floor,
        "measured": {
            "steps": len(measured),
            "step_period_seconds": step_seconds,
            "step_period_min_seconds": min(periods),
            "step_period_max_seconds": max(periods),
            "engine_step_seconds": statistics.median(record.seconds for record, _ in measured),
            "tokens_per_s": args.batch / step_seconds,
        },
        "ratio": step_seconds / floor["seconds"],
    }
    report["passed"] = report["ratio"] <= TARGET_RATIO
    return report


def print_report(report: dict[str, Any]) -> None:
    if "error" in report:
        print(f"error: {report['error']}")
        return
    c, f, m = report["counts"], report["floor"], report["measured"]
    copy, matmul = report["ceilings"]["copy"]["bytes_per_s"], report["ceilings"]["matmul"]["flops_per_s"]
    print(
        f"bytes per step: weights {c['weight_bytes_read'] / 1e9:.3f} GB (model {c['weight_bytes_total'] / 1e9:.3f} "
        f"GB) + KV {c['kv_bytes'] / 1e9:.3f} GB ({c['kv_tokens_read']:.0f} tokens read) + LoRA "
        f"{c['lora_bytes'] / 1e9:.3f} GB = {c['bytes_per_step'] / 1e9:.3f} GB / {copy / 1e9:.1f} GB/s = "
        f"{f['memory_seconds'] * 1e3:.3f} ms"
    )
    print(
        f"FLOPs per step: linear {c['flops_linear'] / 1e12:.3f} T + LM head {c['flops_lm_head'] / 1e12:.3f} T + LoRA "
        f"{c['flops_lora'] / 1e12:.3f} T + attention {c['flops_attention'] / 1e12:.3f} T = "
        f"{c['flops_per_step'] / 1e12:.3f} TFLOP / {matmul / 1e12:.2f} TFLOP/s = {f['compute_seconds'] * 1e3:.3f} ms"
    )
    print(
        f"floor {f['seconds'] * 1e3:.3f} ms ({f['bound']} bound); measured decode step "
        f"{m['step_period_seconds'] * 1e3:.3f} ms (median of {m['steps']}; engine's own step time "
        f"{m['engine_step_seconds'] * 1e3:.3f} ms; "
        f"{m['tokens_per_s']:.1f} tok/s)"
    )
    verdict = "met" if report["passed"] else "missed"
    print(f"step / floor = {report['ratio']:.2f} (goal <= {report['target_ratio']}: {verdict})", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--batch", type=int, default=64, help="concurrent requests (the decode batch)")
    p.add_argument("--adapters", type=int, default=64, help="distinct adapters (request i takes adapter i mod this)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt", type=int, help="prompt tokens per request (default per shape)")
    p.add_argument("--warmup", type=int, help="full decode steps skipped before measuring (default per shape)")
    p.add_argument("--steps", type=int, help="full decode steps measured (default per shape)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--copy-mib", type=int, help="size of the bandwidth copy (default per shape)")
    p.add_argument("--matmul-n", type=int, help="side of the square matmul (default per shape)")
    p.add_argument("--set", action="append", default=[], help="extra engine setting, section.key=value (repeat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="scratch folder for the config, tokenizer and adapters (default: tmp)")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("prompt", "warmup", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, SHAPES[args.shape][name])
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
