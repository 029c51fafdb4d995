"""Scaling benchmark: the shape of S-LoRA's Table 3 over the real gRPC server, 1 to 2,000 distinct adapters.

One request trace (Poisson arrivals, prompt and output lengths as in ``bench_engine.py --quick``, every request
generating exactly its ``max_new_tokens``) is served by a fresh ``loraplex-server`` per configuration: 1, 8, 64,
512 and 2,000 distinct synthetic adapters (q,v targets, float16, ranks drawn from {8, 16, 32, 64}), popularity
uniform and Zipf. The device cache (``--device-slots``) and the host LRU (``--host-mib``) are smaller than the large
sets, so adapters load from disk while traffic runs. The adapters are written once under
``~/.cache/loraplex/scaling-adapters/`` (about 7 GB for 2,000) and reused by later runs.

Per configuration: requests/s and tokens/s (completed over first arrival → last finish), client-side TTFT and
end-to-end p50/p99 (streams), the adapter cache hit rates from the server's ``/metrics`` (device tier: placements
found resident; host tier: lookups found in memory), disk loads, and where the adapters sat at the end (ListAdapters).
For the small counts, PEFT runs the start of the uniform trace in-process (``bench_engine.run_peft_mixed``:
static arrival-order batches of 32 with ``adapter_names``); the loraplex/PEFT ratios are from this one run.

The arrival rate is ``--load`` times the capacity measured at the start (a closed burst on one adapter, which
underestimates it: the burst's batch empties towards its end). With the default 2.5 the server is saturated, so
throughput is its capacity and latency includes the queue that builds up; ``--rate`` fixes the rate instead.

Separately, adapter cold load (disk → resident on the device, ready to serve) per rank on the embedded base, in
process: the file is dropped from the page cache (``posix_fadvise DONTNEED``), then read, validated and placed.

    python loadtests/bench_scaling.py --quick   # 8 and 2,000 adapters, 6 s traces: < 5 minutes once written
    python loadtests/bench_scaling.py           # 1 to 2,000 adapters, 20 s traces: ~15 minutes on 2 cores

Writes ``scaling.json``, ``scaling_throughput.png`` and ``scaling_latency.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*, tests.support: the launcher and helpers shared with the tests

from loadtests.bench_engine import Job, load_peft, run_peft_mixed  # noqa: E402
from loadtests.run_loadtest import embedded_shape, ensure_adapters  # noqa: E402
from loadtests.workload import Distribution, Draw, RequestMix, adapter_ids  # noqa: E402
from loraplex.client import AsyncClient, Client  # noqa: E402
from loraplex.server.config import ModelSettings, default_cache_dir, load_settings  # noqa: E402
from loraplex.server.engine.engine import Engine  # noqa: E402
from loraplex.server.lora.format import WEIGHTS_FILE  # noqa: E402
from loraplex.server.model.loader import LoadedBase, load_base  # noqa: E402
from tests.integration.routing.conftest import metrics_port  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

PREFIX = "scale-"
RANKS = (8, 16, 32, 64)
COUNTS = (1, 8, 64, 512, 2000)
PROMPT_WORDS = "uniform:16:48"  # bench_engine.py --quick: prompts of 16-48 tokens, 8-24 new tokens
OUTPUT_TOKENS = "uniform:8:24"
ZIPF_S = 1.0
# The anchors and goals of issue 6, written into the JSON beside our numbers.
ANCHORS = {
    "s_lora_throughput_loss_5_to_2000": 0.055,  # S-LoRA Table 3, Llama-7B on A100
    "punica_vs_vllm_all_distinct": 12.0,
}
GOALS = {"max_throughput_loss_8_to_2000": 0.15, "max_p99_ttft_ratio_2000_over_8": 2.0, "max_cold_load_p50_ms": 50.0}


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the trace starts
    draw: Draw


@dataclass
class Outcome:
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class RunResult:
    adapters: int
    popularity: str
    requests: int
    distinct_adapters_used: int
    failures: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    device_hit_rate: float | None
    host_hit_rate: float | None
    disk_loads: int
    device_evictions: int
    tiers_at_end: dict[str, int] = field(default_factory=dict)


def scaling_root() -> Path:
    shape = embedded_shape()
    return default_cache_dir() / "scaling-adapters" / f"{shape.hidden_size}x{shape.num_layers}"


def prepare_adapters(count: int) -> tuple[Path, list[str]]:
    """The first ``count`` scaling adapters, written once (the rank of each fixed by its seed)."""
    ids = adapter_ids(PREFIX, count)
    return ensure_adapters(scaling_root(), ids, embedded_shape(), ranks=RANKS), ids


def trace(ids: Sequence[str], zipf_s: float, rate: float, requests: int, seed: int) -> list[Arrival]:
    """Poisson arrivals at ``rate``; adapters by popularity, prompts and outputs by the length distributions."""
    mix = RequestMix(ids, zipf_s, Distribution.parse(PROMPT_WORDS), Distribution.parse(OUTPUT_TOKENS))
    rng = random.Random(seed)
    clock, arrivals = 0.0, []
    for _ in range(requests):
        clock += rng.expovariate(rate)
        arrivals.append(Arrival(clock, mix.draw(rng)))
    return arrivals


async def _stream(client: AsyncClient, arrival: Arrival, start: float) -> Outcome:
    await asyncio.sleep(max(0.0, start + arrival.at - time.perf_counter()))
    began, outcome = time.perf_counter(), Outcome()
    try:
        draw = arrival.draw
        async for chunk in client.stream(
            draw.prompt, adapter=draw.adapter, max_new_tokens=draw.max_new_tokens, ignore_eos=True
        ):
            if outcome.ttft is None:
                outcome.ttft = time.perf_counter() - began
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
        outcome.e2e = time.perf_counter() - began
    except Exception as error:  # a failed request is counted, never the end of the benchmark
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome


def replay(target: str, arrivals: Sequence[Arrival]) -> tuple[list[Outcome], float]:
    """Sends every arrival as a stream at its time; returns the outcomes and seconds from the first arrival to the
    last finish."""

    async def run() -> tuple[list[Outcome], float]:
        async with AsyncClient(target, timeout=1800) as client:
            start = time.perf_counter()
            outcomes = await asyncio.gather(*(_stream(client, a, start) for a in arrivals))
            return list(outcomes), time.perf_counter() - start - arrivals[0].at

    return asyncio.run(run())


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's counters as ``(sample name, sorted labels) -> value``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _count(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _hit_rate(before: dict[Any, float], after: dict[Any, float], tier: str) -> float | None:
    name = "loraplex_adapter_cache_requests_total"
    hits = _count(after, name, tier=tier, result="hit") - _count(before, name, tier=tier, result="hit")
    misses = _count(after, name, tier=tier, result="miss") - _count(before, name, tier=tier, result="miss")
    return hits / (hits + misses) if hits + misses else None


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else float("nan")


def server_flags(device_slots: int, host_mib: int) -> tuple[str, ...]:
    return (
        f"--adapters.device-slots={device_slots}",
        f"--adapters.host-bytes={host_mib << 20}",
        "--adapters.device-bytes=4294967296",
        "--engine.max-running=32",
        "--engine.max-queue=4096",
        "--engine.kv-cache-tokens=16384",
    )


def warm(target: str) -> None:
    """One base-model request, so the first measured request pays no one-off start-up cost."""
    with Client(target, timeout=300) as client:
        client.generate("warm up the server", max_new_tokens=2)


def measure_capacity(target: str, adapter: str, requests: int, seed: int) -> float:
    """Requests/s of a closed burst (every request sent at once) on one adapter: the server's capacity."""
    burst = [Arrival(0.0, a.draw) for a in trace([adapter], 0.0, 1.0, requests, seed + 999)]
    outcomes, seconds = replay(target, burst)
    return sum(o.error is None for o in outcomes) / seconds


def run_config(
    count: int,
    popularity: str,
    arrivals: Sequence[Arrival],
    args: argparse.Namespace,
    scratch: Path,
) -> RunResult:
    """A fresh server over the first ``count`` adapters replays ``arrivals``."""
    root, _ = prepare_adapters(count)
    log = scratch / f"server-{count}-{popularity}.log"
    with ServerProcess.start(log, [root], *server_flags(args.device_slots, args.host_mib)) as server:
        warm(server.target)
        port = metrics_port(server)
        before = scrape(port)
        outcomes, seconds = replay(server.target, arrivals)
        after = scrape(port)
        with Client(server.target) as client:
            tiers = Counter(adapter.tier for adapter in client.list_adapters() if adapter.version)  # loaded ones
        server.stop()
    done = [o for o in outcomes if o.error is None]
    failures = [o.error for o in outcomes if o.error is not None]
    if failures:
        print(f"  {len(failures)} failed, first: {failures[0]}", flush=True)
    loads = "loraplex_adapter_loads_total"
    evictions = "loraplex_adapter_evictions_total"
    return RunResult(
        adapters=count,
        popularity=popularity,
        requests=len(arrivals),
        distinct_adapters_used=len({a.draw.adapter for a in arrivals}),
        failures=len(failures),
        seconds=seconds,
        requests_per_s=len(done) / seconds,
        tokens_per_s=sum(o.tokens for o in done) / seconds,
        ttft_p50_ms=_ms([o.ttft for o in done if o.ttft is not None], 50),
        ttft_p99_ms=_ms([o.ttft for o in done if o.ttft is not None], 99),
        e2e_p50_ms=_ms([o.e2e for o in done if o.e2e is not None], 50),
        e2e_p99_ms=_ms([o.e2e for o in done if o.e2e is not None], 99),
        device_hit_rate=_hit_rate(before, after, "device"),
        host_hit_rate=_hit_rate(before, after, "host"),
        disk_loads=int(
            _count(after, loads, tier="host", outcome="ok") - _count(before, loads, tier="host", outcome="ok")
        ),
        device_evictions=int(_count(after, evictions, tier="device") - _count(before, evictions, tier="device")),
        tiers_at_end=dict(tiers),
    )


def calibrate(args: argparse.Namespace, scratch: Path, requests: int) -> float:
    """The capacity (requests/s) of a fresh server on one adapter, from a closed burst of ``requests``."""
    root, ids = prepare_adapters(1)
    with ServerProcess.start(
        scratch / "server-calibrate.log", [root], *server_flags(args.device_slots, args.host_mib)
    ) as server:
        warm(server.target)
        capacity = measure_capacity(server.target, ids[0], requests, args.seed)
        server.stop()
    return capacity


def peft_baseline(base: LoadedBase, count: int, arrivals: Sequence[Arrival], requests: int) -> dict[str, float]:
    """The first ``requests`` of the trace through PEFT (``bench_engine.run_peft_mixed``: static arrival-order
    batches), prompts tokenized as the server does. A prefix, because PEFT is slow here; at saturation its
    throughput is its batch rate, whatever the trace length."""
    root, ids = prepare_adapters(count)
    jobs = [
        Job(a.at, tuple(base.tokenizer.encode(a.draw.prompt)), a.draw.max_new_tokens, a.draw.adapter)
        for a in arrivals[:requests]
    ]
    peft = load_peft(base, root, ids)
    try:
        pad_id = int(base.tokenizer.pad_token_id or 0)
        run_peft_mixed(peft, [replace(jobs[0], max_new_tokens=2)], pad_id)  # warm-up
        seconds = run_peft_mixed(peft, jobs, pad_id)
    finally:
        peft.unload()
    return {
        "requests": len(jobs),
        "requests_per_s": len(jobs) / seconds,
        "tokens_per_s": sum(j.max_new_tokens for j in jobs) / seconds,
    }


def _drop_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def cold_loads(base: LoadedBase, per_rank: int) -> dict[str, dict[str, float]]:
    """Disk → resident on the device, per rank: page cache dropped, then read + validate (host tier) and place
    (device tier) on an engine that is not stepping (this thread is its engine thread)."""
    root, ids = prepare_adapters(max(COUNTS))
    by_rank: dict[int, list[str]] = {rank: [] for rank in RANKS}
    for index, adapter_id in enumerate(ids):
        by_rank[random.Random(index).choice(RANKS)].append(adapter_id)  # ensure_adapters' choice, seed 0
    settings = load_settings(
        environ={},
        overrides={
            "adapters": {"roots": [str(root)], "device_slots": 4, "loader_threads": 1},
            "engine": {"kv_cache_tokens": 1024, "max_seq_len": 1024, "max_prompt_tokens": 1024, "max_new_tokens": 512},
        },
    )
    engine = Engine(base, settings)
    out: dict[str, dict[str, float]] = {}
    try:
        for rank, chosen in by_rank.items():
            host, total = [], []
            for adapter_id in chosen[-per_rank:]:  # the tail: adapters the traffic runs touched least
                _drop_page_cache(root / adapter_id / WEIGHTS_FILE)
                started = time.perf_counter()
                version = engine.adapters.lookup(adapter_id).result()
                loaded = time.perf_counter()
                if not engine.adapters.acquire_resident(version):
                    raise RuntimeError(f"{adapter_id} could not be placed on the device")
                total.append(time.perf_counter() - started)
                engine.adapters.release(version, served=False)
                host.append(loaded - started)
                if version.rank != rank:
                    raise RuntimeError(f"{adapter_id} has rank {version.rank}, expected {rank}")
                engine.adapters.unload(adapter_id)
            out[str(rank)] = {
                "samples": len(total),
                "p50_ms": _ms(total, 50),
                "p99_ms": _ms(total, 99),
                "disk_to_host_p50_ms": _ms(host, 50),
                "host_to_device_p50_ms": _ms([t - h for t, h in zip(total, host, strict=True)], 50),
            }
    finally:
        engine.adapters.shutdown()
    return out


def summarise(results: Sequence[RunResult]) -> dict[str, Any]:
    """Throughput loss 8 → 2,000 and the p99 TTFT ratio, per popularity, against the goals."""
    out: dict[str, Any] = {}
    for popularity in sorted({r.popularity for r in results}):
        rows = {r.adapters: r for r in results if r.popularity == popularity}
        small, large = rows.get(8), rows.get(max(rows))
        if small is None or large is None or large is small:
            continue
        loss = 1.0 - large.tokens_per_s / small.tokens_per_s
        ratio = large.ttft_p99_ms / small.ttft_p99_ms
        out[popularity] = {
            "from": 8,
            "to": large.adapters,
            "throughput_loss": loss,
            "throughput_goal_met": loss <= GOALS["max_throughput_loss_8_to_2000"],
            "p99_ttft_ratio": ratio,
            "p99_ttft_goal_met": ratio <= GOALS["max_p99_ttft_ratio_2000_over_8"],
        }
    return out


def plot(report: dict[str, Any], out: Path) -> None:
    """Two PNGs against the adapter count (log x): throughput (with the PEFT baselines) and p99 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [RunResult(**row) for row in report["runs"]]
    lines: dict[str, list[tuple[str, list[int], list[float], str]]] = {"throughput": [], "latency": []}
    for popularity in ("uniform", "zipf"):
        rows = sorted((r for r in results if r.popularity == popularity), key=lambda r: r.adapters)
        xs = [r.adapters for r in rows]
        lines["throughput"].append((f"loraplex, {popularity}", xs, [r.tokens_per_s for r in rows], "o-"))
        lines["latency"].append((f"p99 TTFT, {popularity}", xs, [r.ttft_p99_ms / 1e3 for r in rows], "o-"))
        lines["latency"].append((f"p99 end-to-end, {popularity}", xs, [r.e2e_p99_ms / 1e3 for r in rows], "^--"))
        baselines = sorted((p for p in report["peft"] if p["popularity"] == popularity), key=lambda p: p["adapters"])
        if baselines:
            xs = [p["adapters"] for p in baselines]
            lines["throughput"].append((f"PEFT, {popularity}", xs, [p["tokens_per_s"] for p in baselines], "s--"))
    titles = {"throughput": ("tokens/s", "Throughput vs adapter count"), "latency": ("seconds", "p99 latency")}
    for name, series in lines.items():
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        for label, xs, ys, style in series:
            if xs:
                axis.plot(xs, ys, style, label=label)
        ylabel, title = titles[name]
        axis.set(xscale="log", xlabel="distinct adapters", ylabel=ylabel, title=title)
        axis.set_ylim(bottom=0)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / f"scaling_{name}.png", dpi=120)
        plt.close(figure)


def save(report: dict[str, Any], out: Path, started: float) -> None:
    """Writes the JSON and the plots as they stand (after each stage, so a late failure loses nothing)."""
    report["seconds"] = time.perf_counter() - started
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    plot(report, out)


def print_table(report: dict[str, Any]) -> None:
    peft = {(p["adapters"], p["popularity"]): p for p in report.get("peft", [])}
    print(
        "\nadapters popularity  req/s  tok/s  TTFT p50/p99 ms   e2e p50/p99 ms   device hit  host hit  disk loads  "
        "x PEFT"
    )
    for row in report["runs"]:
        r = RunResult(**row)
        baseline = peft.get((r.adapters, r.popularity))
        ratio = f"{r.tokens_per_s / baseline['tokens_per_s']:.2f}" if baseline else ""
        device = "" if r.device_hit_rate is None else f"{r.device_hit_rate:.1%}"
        host = "" if r.host_hit_rate is None else f"{r.host_hit_rate:.1%}"
        print(
            f"{r.adapters:8d} {r.popularity:10s} {r.requests_per_s:6.2f} {r.tokens_per_s:6.1f} "
            f"{r.ttft_p50_ms:7.0f}/{r.ttft_p99_ms:<7.0f} {r.e2e_p50_ms:7.0f}/{r.e2e_p99_ms:<7.0f} "
            f"{device:>10s} {host:>9s} {r.disk_loads:10d}  {ratio}"
        )
    for popularity, goal in report["goals"].items():
        print(
            f"[{popularity}] throughput loss 8 → {goal['to']}: {goal['throughput_loss']:.1%} "
            f"(goal ≤ 15%: {'met' if goal['throughput_goal_met'] else 'missed'}); p99 TTFT ratio "
            f"{goal['p99_ttft_ratio']:.2f} (goal ≤ 2: {'met' if goal['p99_ttft_goal_met'] else 'missed'})"
        )
    for rank, values in report.get("cold_load", {}).items():
        print(
            f"cold load rank {rank:>2s}: p50 {values['p50_ms']:.1f} ms, p99 {values['p99_ms']:.1f} ms "
            f"(disk → host p50 {values['disk_to_host_p50_ms']:.1f}, host → device p50 "
            f"{values['host_to_device_p50_ms']:.1f}; {values['samples']} samples)"
        )


def markdown(report: dict[str, Any]) -> str:
    """The run as the Markdown table of BENCHMARKS.md (``--markdown FILE.json`` prints it again later)."""
    peft = {p["adapters"]: p for p in report.get("peft", [])}
    lines = [
        "| adapters | popularity | distinct used | req/s | tok/s | TTFT p50 / p99 (s) | e2e p50 / p99 (s) "
        "| device hit | host hit | disk loads | PEFT tok/s | loraplex / PEFT |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["runs"]:
        r = RunResult(**row)
        baseline = peft.get(r.adapters) if r.popularity == "uniform" else None
        peft_cells = (
            f"{baseline['tokens_per_s']:.1f} | {r.tokens_per_s / baseline['tokens_per_s']:.2f}" if baseline else " | "
        )
        rate = "n/a" if r.device_hit_rate is None else f"{r.device_hit_rate:.0%}"
        host = "n/a" if r.host_hit_rate is None else f"{r.host_hit_rate:.0%}"
        lines.append(
            f"| {r.adapters:,} | {r.popularity} | {r.distinct_adapters_used} | {r.requests_per_s:.2f} | "
            f"{r.tokens_per_s:.1f} | {r.ttft_p50_ms / 1e3:.2f} / {r.ttft_p99_ms / 1e3:.2f} | "
            f"{r.e2e_p50_ms / 1e3:.1f} / {r.e2e_p99_ms / 1e3:.1f} | {rate} | {host} | {r.disk_loads} | {peft_cells} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer configurations and a short trace (< 5 minutes)")
    parser.add_argument("--counts", help="adapter counts, comma-separated (default 1,8,64,512,2000)")
    parser.add_argument("--popularity", default="uniform,zipf", help="uniform and/or zipf")
    parser.add_argument("--trace-seconds", type=float, help="trace length at the arrival rate (default 20; quick 6)")
    parser.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s (default: --load x capacity)")
    parser.add_argument("--load", type=float, default=2.5, help="arrival rate over the measured capacity")
    parser.add_argument("--device-slots", type=int, default=32, help="device adapter slots (= the batch's max)")
    parser.add_argument("--host-mib", type=int, default=1024, help="host adapter cache (MiB)")
    parser.add_argument("--peft-max", type=int, help="PEFT baselines for counts up to this (default 8)")
    parser.add_argument("--peft-requests", type=int, help="PEFT runs this prefix of the trace (default 16; quick 8)")
    parser.add_argument("--cold-per-rank", type=int, help="cold loads per rank (default 20; quick 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "scaling")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="only print the table of an earlier run")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return

    quick = args.quick
    counts = [int(c) for c in args.counts.split(",")] if args.counts else ([8, 2000] if quick else list(COUNTS))
    popularities = args.popularity.split(",")
    trace_seconds = args.trace_seconds or (6.0 if quick else 20.0)
    peft_max = args.peft_max if args.peft_max is not None else 8
    peft_requests = args.peft_requests or (8 if quick else 16)
    per_rank = args.cold_per_rank if args.cold_per_rank is not None else (5 if quick else 20)
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    prepare_adapters(max(counts))
    print(f"{max(counts)} adapters ready under {scaling_root()} ({time.perf_counter() - started:.0f} s)", flush=True)
    report: dict[str, Any] = {
        "settings": {
            "counts": counts,
            "popularity": popularities,
            "zipf_s": ZIPF_S,
            "prompt_words": PROMPT_WORDS,
            "output_tokens": OUTPUT_TOKENS,
            "device_slots": args.device_slots,
            "host_mib": args.host_mib,
            "ranks": RANKS,
            "targets": "q_proj,v_proj",
            "dtype": "float16",
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "anchors": ANCHORS,
        "goal_limits": GOALS,
        "runs": [],
        "peft": [],
    }
    results: list[RunResult] = []
    peft_traces: list[tuple[int, str, list[Arrival]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        rate = args.rate
        if rate is None:
            capacity = calibrate(args, Path(scratch), 12 if quick else 32)
            rate = args.load * capacity
            report["settings"]["capacity_requests_per_s"] = capacity
            print(f"capacity {capacity:.2f} requests/s on one adapter -> arrivals at {rate:.2f}/s", flush=True)
        requests = max(8, round(rate * trace_seconds))
        for count in counts:
            for popularity in popularities:
                zipf_s = ZIPF_S if popularity == "zipf" else 0.0
                arrivals = trace(adapter_ids(PREFIX, count), zipf_s, rate, requests, args.seed)
                print(f"[{count} adapters, {popularity}] {requests} requests at {rate:.2f}/s", flush=True)
                result = run_config(count, popularity, arrivals, args, Path(scratch))
                results.append(result)
                report["runs"].append(asdict(result))
                print(f"  {json.dumps(asdict(result))}", flush=True)
                if count <= peft_max and popularity == "uniform":  # PEFT once per count: its cost barely moves
                    peft_traces.append((count, popularity, arrivals))
        report["settings"]["rate_requests_per_s"] = rate
    report["goals"] = summarise(results)
    save(report, args.out, started)
    if peft_traces or per_rank:
        base = load_base(ModelSettings())
        if per_rank:
            report["cold_load"] = cold_loads(base, per_rank)
            save(report, args.out, started)
        for count, popularity, arrivals in peft_traces:
            print(f"[PEFT {count} adapters, {popularity}]", flush=True)
            baseline = peft_baseline(base, count, arrivals, peft_requests)
            report["peft"].append({"adapters": count, "popularity": popularity, **baseline})
            save(report, args.out, started)
    print_table(report)
    print("\n" + markdown(report))
    print(f"\n{time.perf_counter() - started:.0f} s; JSON and plots under {args.out}")


if __name__ == "__main__":
    main()
