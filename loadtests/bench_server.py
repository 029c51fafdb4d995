"""Mixed-adapter decode through the real server (issue 13): 32 distinct adapters in one batch against the base alone.

Per adapter set, a fresh ``loraplex-server`` (embedded base, the set's 32 synthetic adapters with random non-zero B,
float16 files, written once under ``~/.cache/loraplex/server-bench-adapters/``) serves three timed phases of unary
``Generate`` calls from the project's ``AsyncClient``, always ``--in-flight`` (32) requests outstanding:

  base1  ``--requests`` (64) requests on the base model
  mixed  the same number, request i on adapter i % 32 (every batch mixes all 32 adapters)
  base2  the base model again (base1 and base2 bracket the mixed phase, so drift on a shared machine shows)

Every request sends the same prompt of exactly ``--prompt-tokens`` (25) tokens (plain words, fitted with the
server's own Tokenize), decodes greedily (temperature 0) and generates exactly ``--new-tokens`` (32) tokens
(``ignore_eos``). Before the timed phases: a few base requests, then every adapter is pinned (LoadAdapter with
``pin``) and served once, so the mixed phase loads nothing (device slots >= 33, one kept for unpinned traffic; the
status must show all of them on the device). Per phase: generated tokens / wall seconds (first send → last finish),
and the server-side p50 TTFT (``timings.time_to_first_token``: accepted → first token, queueing included) and p50
inter-token latency (``(engine - TTFT) / (tokens - 1)`` of each request). Sets: *light* = rank 8 on q_proj,v_proj;
*heavy* = rank 16 on all seven linears (``bench_engine.SHAPES``). The headline is mixed ÷ mean(base1, base2).

    python loadtests/bench_server.py --quick --sets light     # 32 requests per phase: a smoke run, ~2 minutes
    python loadtests/bench_server.py --json server.json       # both sets, 64 requests per phase
    python loadtests/bench_server.py --server-arg=--model.threads=1 --server-arg=--engine.lora-kernel=gather

``--target HOST:PORT`` measures a server that is already running instead: its adapter roots must hold the set's
adapters (ids ``light-0000`` … ``light-0031``, ``heavy-0000`` …); ``--prepare-only`` writes them and prints the
roots to start that server with (``--adapter-root ROOT`` per set; its device slots must be >= 33). The adapters are
pinned there too, and stay pinned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*, tests.support: the launcher and helpers shared with the tests

from loadtests.bench_engine import SHAPES  # noqa: E402
from loadtests.run_loadtest import embedded_shape  # noqa: E402
from loadtests.workload import WORDS, adapter_ids  # noqa: E402
from loraplex.client import AsyncClient  # noqa: E402
from loraplex.client.types import GenerateOptions  # noqa: E402
from loraplex.server.config import default_cache_dir  # noqa: E402
from loraplex.server.core.shape import ModelShape  # noqa: E402
from loraplex.server.lora.format import CONFIG_FILE  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

SETS = ("light", "heavy")
PHASES = ("base1", "mixed", "base2")
DISTINCT_ADAPTERS = 32
BASE_WARM_REQUESTS = 4
TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Workload:
    requests: int = 64  # per phase
    in_flight: int = 32
    new_tokens: int = 32
    prompt_tokens: int = 25
    adapters: int = DISTINCT_ADAPTERS


@dataclass(frozen=True)
class Sample:
    """One finished request: tokens generated and prompted, server-side TTFT and engine seconds."""

    tokens: int
    prompt_tokens: int
    ttft: float
    engine: float

    @property
    def inter_token(self) -> float | None:
        return (self.engine - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    requests: int
    failures: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float | None
    itl_p50_ms: float | None
    prompt_tokens: list[int]  # the distinct prompt lengths the server reported

    @classmethod
    def of(cls, phase: str, samples: Sequence[Sample], failures: int, seconds: float) -> PhaseResult:
        tokens = sum(s.tokens for s in samples)
        itl = [v for s in samples if (v := s.inter_token) is not None]
        return cls(
            phase=phase,
            requests=len(samples) + failures,
            failures=failures,
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            ttft_p50_ms=statistics.median(s.ttft for s in samples) * 1e3 if samples else None,
            itl_p50_ms=statistics.median(itl) * 1e3 if itl else None,
            prompt_tokens=sorted({s.prompt_tokens for s in samples}),
        )


def mixed_over_base(base1: float, mixed: float, base2: float) -> float:
    """The headline: mixed tokens/s over the mean of the two base phases around it."""
    return mixed / ((base1 + base2) / 2)


@dataclass(frozen=True)
class SetResult:
    name: str
    rank: int
    targets: list[str]
    adapters_on_device: int  # after the warm-up, before the timed phases
    phases: dict[str, PhaseResult]

    @property
    def ratio(self) -> float:
        return mixed_over_base(*(self.phases[p].tokens_per_s for p in PHASES))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mixed_over_base": self.ratio}


def set_ids(name: str, count: int = DISTINCT_ADAPTERS) -> list[str]:
    return adapter_ids(f"{name}-", count)


def phase_adapters(phase: str, requests: int, ids: Sequence[str]) -> list[str | None]:
    """The adapter of each request of ``phase`` (None: the base): request i of the mixed phase on ``ids[i % n]``."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    if phase == "mixed":
        return [ids[index % len(ids)] for index in range(requests)]
    return [None] * requests


def adapter_root(name: str, shape: ModelShape) -> Path:
    return default_cache_dir() / "server-bench-adapters" / f"{shape.hidden_size}x{shape.num_layers}-{name}"


def prepare_adapters(name: str, shape: ModelShape, count: int = DISTINCT_ADAPTERS) -> tuple[Path, list[str]]:
    """The set's adapters (rank and targets from ``SHAPES``), written once; the config file last, so an
    interrupted write is redone."""
    import torch

    from loadtests.synthetic_adapters import write_adapter

    spec, root, ids = SHAPES[name], adapter_root(name, shape), set_ids(name, count)
    for seed, adapter_id in enumerate(ids):
        if not (root / adapter_id / CONFIG_FILE).exists():
            write_adapter(root / adapter_id, shape, spec["rank"], spec["targets"], seed=seed, dtype=torch.float16)
    return root, ids


async def fit_prompt(count_tokens: Callable[[str], Awaitable[int]], tokens: int, seed: int = 0, tries: int = 50) -> str:
    """A prompt of plain words whose tokenization (``count_tokens``: the server's Tokenize) is exactly ``tokens``
    long: words are added until it is long enough; an overshoot (a last word of several tokens) starts again with
    other words."""
    for attempt in range(tries):
        rng, words = random.Random(seed + attempt), []
        while True:
            words.append(rng.choice(WORDS))
            found = await count_tokens(" ".join(words))
            if found >= tokens:
                break
        if found == tokens:
            return " ".join(words)
    raise ValueError(f"no prompt of exactly {tokens} tokens in {tries} tries")


async def server_count(client: AsyncClient, text: str) -> int:
    return (await client.tokenize(text)).count


def options(adapter: str | None, new_tokens: int) -> GenerateOptions:
    chosen = GenerateOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, timeout=TIMEOUT_S)
    if adapter is not None:
        chosen["adapter"] = adapter
    return chosen


async def run_requests(
    client: AsyncClient,
    prompt: str,
    adapters: Sequence[str | None],
    in_flight: int,
    new_tokens: int,
    extra: GenerateOptions | None = None,
) -> tuple[list[Sample], list[str], float]:
    """Sends one request per entry of ``adapters`` with ``in_flight`` outstanding (a worker each), each with
    :func:`options` plus ``extra`` (a constraint, say); returns the finished samples, the errors, and seconds from
    the first send to the last finish."""
    queue = list(adapters)[::-1]  # popped from the end: request order
    samples: list[Sample] = []
    errors: list[str] = []

    async def worker() -> None:
        while queue:
            chosen = options(queue.pop(), new_tokens)
            chosen.update(extra or {})
            try:
                done = await client.generate(prompt, **chosen)
            except Exception as error:  # a failed request is counted, never the end of the benchmark
                errors.append(f"{type(error).__name__}: {error}")
                continue
            usage, timings = done.usage, done.timings
            samples.append(
                Sample(usage.completion_tokens, usage.prompt_tokens, timings.time_to_first_token, timings.engine)
            )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(in_flight, len(adapters)))))
    return samples, errors, time.perf_counter() - started


async def warm_up(client: AsyncClient, prompt: str, ids: Sequence[str], workload: Workload) -> int:
    """Base requests, then every adapter pinned and served once; returns the adapters on the device after it."""
    await run_requests(client, prompt, [None] * BASE_WARM_REQUESTS, BASE_WARM_REQUESTS, workload.new_tokens)
    await asyncio.gather(*(client.load_adapter(adapter_id, pin=True, timeout=TIMEOUT_S) for adapter_id in ids))
    _, errors, _ = await run_requests(client, prompt, list(ids), workload.in_flight, 2)
    if errors:
        raise RuntimeError(f"{len(errors)} warm-up requests on the adapters failed, first: {errors[0]}")
    return (await client.status()).adapters_on_device


async def bench_set(target: str, name: str, ids: Sequence[str], workload: Workload) -> SetResult:
    async with AsyncClient(target, timeout=TIMEOUT_S) as client:
        prompt = await fit_prompt(lambda text: server_count(client, text), workload.prompt_tokens)
        on_device = await warm_up(client, prompt, ids, workload)
        if on_device < len(ids):
            print(f"  warning: {on_device} adapters on the device after the warm-up, not {len(ids)}", flush=True)
        phases: dict[str, PhaseResult] = {}
        for phase in PHASES:
            adapters = phase_adapters(phase, workload.requests, ids)
            samples, errors, seconds = await run_requests(
                client, prompt, adapters, workload.in_flight, workload.new_tokens
            )
            phases[phase] = result = PhaseResult.of(phase, samples, len(errors), seconds)
            if errors:
                print(f"  {phase}: {len(errors)} failed, first: {errors[0]}", flush=True)
            print(f"  {phase}: {result.tokens} tokens in {seconds:.2f} s = {result.tokens_per_s:.1f} tok/s", flush=True)
    spec = SHAPES[name]
    return SetResult(name, spec["rank"], list(spec["targets"]), on_device, phases)


def server_flags(workload: Workload, extra: Sequence[str] = ()) -> list[str]:
    """Room for every adapter on the device and every request in the batch; ``extra`` (--server-arg) last, so it
    overrides these."""
    return [
        f"--adapters.device-slots={max(DISTINCT_ADAPTERS, workload.adapters) + 1}",  # one slot stays unpinned
        f"--engine.max-running={max(32, workload.in_flight)}",
        "--engine.max-queue=4096",
        *extra,
    ]


def run_set(name: str, workload: Workload, args: argparse.Namespace, scratch: Path) -> SetResult:
    if args.target:
        return asyncio.run(bench_set(args.target, name, set_ids(name, workload.adapters), workload))
    root, ids = prepare_adapters(name, embedded_shape(), workload.adapters)
    log = scratch / f"server-{name}.log"
    with ServerProcess.start(log, [root], *server_flags(workload, args.server_arg)) as server:
        print(f"[{name}] server {server.target}", flush=True)
        result = asyncio.run(bench_set(server.target, name, ids, workload))
        server.stop()
    return result


def format_set(result: SetResult, workload: Workload) -> str:
    lines = [
        f"\n[{result.name}] rank {result.rank} on {','.join(result.targets)}; {workload.requests} requests per phase, "
        f"{workload.in_flight} in flight, {workload.prompt_tokens}-token prompt, {workload.new_tokens} new tokens; "
        f"{result.adapters_on_device} adapters on the device",
        "phase  requests failures  tokens  seconds    tok/s  TTFT p50 ms  ITL p50 ms  prompt tokens",
    ]
    for p in result.phases.values():
        ttft = "" if p.ttft_p50_ms is None else f"{p.ttft_p50_ms:.0f}"
        itl = "" if p.itl_p50_ms is None else f"{p.itl_p50_ms:.1f}"
        lines.append(
            f"{p.phase:6s} {p.requests:8d} {p.failures:8d} {p.tokens:7d} {p.seconds:8.2f} {p.tokens_per_s:8.1f} "
            f"{ttft:>12s} {itl:>11s}  {','.join(map(str, p.prompt_tokens))}"
        )
    return "\n".join(lines)


def summary_table(results: Sequence[SetResult]) -> str:
    lines = ["\nset     base1 tok/s  mixed tok/s  base2 tok/s  mixed ÷ mean(base1, base2)"]
    for r in results:
        base1, mixed, base2 = (r.phases[p].tokens_per_s for p in PHASES)
        lines.append(f"{r.name:6s} {base1:12.1f} {mixed:12.1f} {base2:12.1f}  {r.ratio:10.2f}")
    return "\n".join(lines)


def parse_sets(text: str) -> list[str]:
    sets = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SETS]
    if unknown or not sets:
        raise argparse.ArgumentTypeError(f"unknown sets {unknown or text!r}; choose from {','.join(SETS)}")
    return sets


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Workload]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=parse_sets, default=list(SETS), help="light and/or heavy, comma-separated")
    parser.add_argument("--quick", action="store_true", help="32 requests per phase (a smoke run)")
    parser.add_argument("--requests", type=int, help="requests per phase (default 64; quick 32)")
    parser.add_argument("--in-flight", type=int, default=Workload.in_flight, help="requests outstanding at once")
    parser.add_argument("--new-tokens", type=int, default=Workload.new_tokens, help="tokens generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=Workload.prompt_tokens, help="tokens of the prompt")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="passed to the server (repeatable): --server-arg=--x.y=1"
    )
    parser.add_argument("--target", help="HOST:PORT of a running server holding the adapters (none is started)")
    parser.add_argument("--prepare-only", action="store_true", help="write the adapters, print their roots, exit")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    requests = args.requests if args.requests is not None else (32 if args.quick else Workload.requests)
    for flag, value in (("--requests", requests), ("--in-flight", args.in_flight), ("--new-tokens", args.new_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.prompt_tokens < 1:
        parser.error("--prompt-tokens must be at least 1")
    if args.target and args.server_arg:
        parser.error("--server-arg needs a server to start; with --target none is started")
    return args, Workload(requests, args.in_flight, args.new_tokens, args.prompt_tokens)


def main(argv: Sequence[str] | None = None) -> None:
    args, workload = parse_args(argv)
    if args.prepare_only:
        shape = embedded_shape()
        for name in args.sets:
            root, ids = prepare_adapters(name, shape, workload.adapters)
            print(f"{name}: {len(ids)} adapters under {root}")
        return
    started = time.perf_counter()
    report: dict[str, Any] = {
        "workload": asdict(workload),
        "target": args.target,
        "server_args": args.server_arg,
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "sets": {},
    }
    results: list[SetResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-server-") as scratch:
        for name in args.sets:
            result = run_set(name, workload, args, Path(scratch))
            results.append(result)
            report["sets"][name] = result.to_json()
            print(format_set(result, workload), flush=True)
    report["load_average_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    print(summary_table(results))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"results in {args.json}")
    print(f"{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
