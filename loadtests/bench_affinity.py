"""Bounded-load adapter affinity vs round robin across replicas: adapter cache hit rates, throughput, p99 TTFT.

Real ``loraplex-server`` replicas (embedded base, small per-replica adapter caches), each pinned to its own CPU
(``taskset``) with a small batch, sit behind Debian's HAProxy running the shipped deploy/haproxy template: once as
shipped (consistent hashing on ``x-loraplex-affinity`` with ``hash-balance-factor``;
``haproxy-bounded-affinity@125`` names another factor), once with ``balance roundrobin``; optionally behind vLLM's
router (``vllm-router-<its policy>``, over the replicas' OpenAI HTTP API: loadtests/vllm_router.py). A host-cache
miss costs what a fetch from a remote adapter store costs (``adapters.fetch_latency_ms`` and ``fetch_bytes_per_s``).
Every policy replays the same trace: requests over many synthetic adapters with Zipf or uniform popularity, streamed
by a fixed number of closed-loop workers (``loraplex.client.AsyncClient`` over gRPC; OpenAI completions over HTTP
for vLLM's router). Per popularity the policies alternate in ABBA order (AB BA AB ..., ABC CBA ABC ... for more);
every round uses fresh adapter ids (hard links to the same weight files), so each round starts with cold adapter
caches and the replicas stay up. Hit rates come from the replicas' ``/metrics``
(``loraplex_adapter_cache_requests_total{tier,result}``), TTFT is what the client sees.

The ratios (each policy ÷ round robin: vLLM's router's policies ÷ its own round robin where that ran, else ÷
HAProxy's) come from the same run, the same replicas and the same trace, overall and per ABBA pair (the spread of
the pairs shows how much a shared machine moved them).

    .venv/bin/python loadtests/bench_affinity.py           # the BENCHMARKS.md numbers
    .venv/bin/python loadtests/bench_affinity.py --quick   # a smoke run: one short round per policy and popularity
    .venv/bin/python loadtests/bench_affinity.py --policies haproxy-bounded-affinity@110,haproxy-bounded-affinity@125,\
        haproxy-round-robin                                  # a sweep of the load bound
    .venv/bin/python loadtests/bench_affinity.py --vllm-router /tmp/vr/bin/vllm-router \
        --policies haproxy-bounded-affinity,haproxy-round-robin,vllm-router-consistent-hash,vllm-router-round-robin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the server and HAProxy launchers shared with the integration tests

from loadtests.synthetic_adapters import ALL_LINEAR, write_adapter  # noqa: E402
from loadtests.vllm_router import SESSION_HEADER, VllmRouter  # noqa: E402
from loraplex.client import AsyncClient  # noqa: E402
from loraplex.client.affinity import AFFINITY_HEADER  # noqa: E402
from loraplex.server.config import default_cache_dir  # noqa: E402
from loraplex.server.core.shape import ModelShape  # noqa: E402
from loraplex.server.model.embedded import resolve_model_dir  # noqa: E402
from tests.support.deploy.haproxy import SHIPPED_FACTOR, Balance, HaproxyProcess  # noqa: E402
from tests.support.deploy.replicas import running_replicas  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

METRICS_LOG = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
PROMPTS = (
    "Summarize the customer's complaint in one sentence.",
    "Classify this ticket: my invoice shows the wrong amount.",
    "Extract the order number from: order 4471 never arrived.",
    "Rewrite politely: send me the report now.",
)
CacheCounts = dict[tuple[str, str], float]  # (tier, result) -> requests
VLLM_ROUTER = "vllm-router-"  # a policy named vllm-router-<its --policy, dashes for underscores>
BASELINES = (str(Balance.ROUND_ROBIN), f"{VLLM_ROUTER}round-robin")


@dataclass(frozen=True)
class Workload:
    replicas: int = 2
    cpus: str = "0,1"  # replica i runs on CPU cpus[i % n] (taskset); "" = unpinned
    adapters: int = 24
    rank: int = 16
    requests: int = 192  # per round (96 left the cold start of each round a large share of it)
    concurrency: int = 6
    max_new_tokens: int = 8
    popularities: str = "zipf,uniform"  # each gets its own ABBA rounds
    policies: str = f"{Balance.AFFINITY},{Balance.ROUND_ROBIN}"  # haproxy-bounded-affinity[@factor], vllm-router-...
    zipf: float = 1.0  # Zipf popularity of adapter i ∝ 1/(i+1)^zipf
    device_slots: int = 4  # per replica
    host_adapters: int = 8  # per replica: the host LRU holds this many adapters
    max_running: int = 4  # per replica (engine.max_running): a small batch on one core
    fetch_latency_ms: float = 50.0  # a host-cache miss: the remote store's latency ...
    fetch_mb_per_s: float = 100.0  # ... plus the weights over its bandwidth (MB/s)
    rounds: int = 3  # per policy and popularity: AB BA AB for two policies, three pairs
    balance_factor: int = SHIPPED_FACTOR  # HAProxy's hash-balance-factor (the template ships 150) without @factor
    vllm_router: str = "vllm-router"  # its binary, for the vllm-router-* policies
    seed: int = 7


@dataclass
class Round:
    policy: str
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cache: CacheCounts = field(default_factory=dict)
    per_replica: list[float] = field(default_factory=list)  # requests each replica served


def trace(load: Workload, popularity: str) -> list[tuple[int, str]]:
    """The requests of one round: (adapter index, prompt), the same for every round and policy of a popularity."""
    rng = random.Random(load.seed)
    exponent = {"zipf": load.zipf, "uniform": 0.0}[popularity]
    weights = [1 / (index + 1) ** exponent for index in range(load.adapters)]
    return [(rng.choices(range(load.adapters), weights)[0], rng.choice(PROMPTS)) for _ in range(load.requests)]


def adapter_id(round_index: int, index: int) -> str:
    return f"r{round_index}-tenant-{index:02d}"


def policies(load: Workload) -> list[str]:
    return load.policies.split(",")


def warm_up_round(load: Workload) -> int:
    """The adapter-id round of the unmeasured warm-up, after every measured round's."""
    return load.rounds * len(policies(load)) * len(load.popularities.split(","))


def write_adapters(root: Path, load: Workload) -> int:
    """Round 0's adapters, then hard links of their files under every later round's ids and the warm-up's (the
    last); returns bytes each."""
    shape = ModelShape.from_config(AutoConfig.from_pretrained(resolve_model_dir("embedded", default_cache_dir())))
    for index in range(load.adapters):
        write_adapter(root / adapter_id(0, index), shape, load.rank, ALL_LINEAR, seed=1000 + index)
        for round_index in range(1, warm_up_round(load) + 1):
            linked = root / adapter_id(round_index, index)
            linked.mkdir()
            for file in (root / adapter_id(0, index)).iterdir():
                os.link(file, linked / file.name)
    return sum(f.stat().st_size for f in (root / adapter_id(0, 0)).iterdir())


def metrics_url(replica: ServerProcess) -> str:
    found = replica.wait_for_log(METRICS_LOG)
    return f"http://127.0.0.1:{found.group(2)}/metrics"


def scrape(url: str) -> tuple[CacheCounts, float]:
    """The replica's adapter cache lookups by (tier, result), its adapter loads by ("<tier> loads", outcome), and
    the requests it has finished."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    cache: CacheCounts = defaultdict(float)
    served = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraplex_adapter_cache_requests_total":
                cache[(sample.labels["tier"], sample.labels["result"])] += sample.value
            elif sample.name == "loraplex_adapter_loads_total":
                cache[(f"{sample.labels['tier']} loads", sample.labels["outcome"])] += sample.value
            elif sample.name == "loraplex_requests_total":
                served += sample.value
    return dict(cache), served


def stream_http(base_url: str, adapter: str, prompt: str, load: Workload) -> float:
    """One streamed OpenAI completion: seconds to its first text chunk. Raises unless the stream ends in [DONE]."""
    body = {"model": adapter, "prompt": prompt, "max_tokens": load.max_new_tokens, "stream": True, "ignore_eos": True}
    headers = {"Content-Type": "application/json", AFFINITY_HEADER: adapter, SESSION_HEADER: adapter}
    request = urllib.request.Request(f"{base_url}/v1/completions", json.dumps(body).encode(), headers)
    started = time.perf_counter()
    first: float | None = None
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if line.strip() == b"data: [DONE]":
                if first is None:
                    raise RuntimeError("a stream without text")
                return first
            if line.startswith(b"data:"):
                if "choices" not in json.loads(line[5:]):
                    raise RuntimeError(f"an error event: {line!r}")
                first = first or time.perf_counter() - started
    raise RuntimeError("the stream ended without [DONE]")


async def replay(target: str, round_index: int, requests: Sequence[tuple[int, str]], load: Workload) -> Round:
    """Closed loop: ``load.concurrency`` workers stream the requests in order; TTFT as the client sees it. An
    ``http://`` target gets OpenAI completions (one thread per call), anything else gRPC."""
    result = Round(policy="")
    pending = list(requests)
    http = target.startswith("http")
    async with AsyncExitStack() as stack:
        client = None if http else await stack.enter_async_context(AsyncClient(target, timeout=300))

        async def first_token(adapter: str, prompt: str) -> float:
            if client is None:
                return await asyncio.to_thread(stream_http, target, adapter, prompt, load)
            started = time.perf_counter()
            first: float | None = None
            async for _chunk in client.stream(
                prompt, adapter=adapter, max_new_tokens=load.max_new_tokens, ignore_eos=True
            ):
                first = first or time.perf_counter() - started
            if first is None:
                raise RuntimeError("a stream without chunks")
            return first

        async def worker() -> None:
            while pending:
                index, prompt = pending.pop(0)
                try:
                    result.ttft.append(await first_token(adapter_id(round_index, index), prompt))
                except Exception:
                    result.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        result.seconds = time.perf_counter() - started
    return result


@contextmanager
def proxy(policy: str, replicas: list[ServerProcess], run_dir: Path, load: Workload) -> Iterator[str]:
    """The front of ``policy`` for one round: the gRPC target of HAProxy, or vLLM's router's base URL."""
    if policy.startswith(VLLM_ROUTER):
        with VllmRouter.start(
            load.vllm_router, run_dir, replicas, policy.removeprefix(VLLM_ROUTER).replace("-", "_")
        ) as router:
            yield router.url
        return
    balance, _, factor = policy.partition("@")
    with HaproxyProcess.start(run_dir, replicas, Balance(balance), int(factor or load.balance_factor)) as haproxy:
        yield haproxy.target


def run_round(
    replicas: list[ServerProcess],
    urls: list[str],
    policy: str,
    round_index: int,
    requests: Sequence[tuple[int, str]],
    load: Workload,
    run_dir: Path,
) -> Round:
    before = [scrape(url) for url in urls]
    with proxy(policy, replicas, run_dir / f"proxy-{round_index}", load) as target:
        result = asyncio.run(replay(target, round_index, requests, load))
    after = [scrape(url) for url in urls]
    result.policy = policy
    for (old_cache, old_served), (new_cache, new_served) in zip(before, after, strict=True):
        for key, value in new_cache.items():
            result.cache[key] = result.cache.get(key, 0.0) + value - old_cache.get(key, 0.0)
        result.per_replica.append(new_served - old_served)
    return result


def hit_rate(cache: CacheCounts, tier: str) -> float:
    hits, misses = cache.get((tier, "hit"), 0.0), cache.get((tier, "miss"), 0.0)
    return hits / (hits + misses) if hits + misses else float("nan")


def summary(rounds: list[Round], load: Workload) -> dict[str, float | str]:
    cache: CacheCounts = defaultdict(float)
    for result in rounds:
        for key, value in result.cache.items():
            cache[key] += value
    ttft = np.array([t for result in rounds for t in result.ttft])
    done = len(ttft)
    seconds = sum(result.seconds for result in rounds)
    spread = [max(r.per_replica) / (sum(r.per_replica) / len(r.per_replica)) for r in rounds if sum(r.per_replica)]
    return {
        "policy": rounds[0].policy,
        "requests": done,
        "errors": sum(result.errors for result in rounds),
        # A device hit: the adapter already sat in a slot when the request reached the head of the queue (a
        # prefetch that request caused does not make it one).
        "device_hit_rate": hit_rate(cache, "device"),
        # Slot writes (prefetched or not) per request: how often an adapter had to be copied in for a request.
        "unwritten_rate": 1 - cache.get(("device loads", "ok"), 0.0) / done,
        "host_hit_rate": hit_rate(cache, "host"),
        "requests_per_s": done / seconds,
        "tokens_per_s": done * load.max_new_tokens / seconds,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "busiest_replica_vs_mean": float(np.mean(spread)),
    }


def table(rows: list[dict[str, float | str]]) -> str:
    head = (
        "| policy | requests | errors | device-slot hit rate | requests without a slot write | host-cache hit rate "
        "| requests/s | tokens/s | TTFT p50 (s) | TTFT p99 (s) | busiest replica / mean |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        lines.append(
            f"| {row['policy']} | {row['requests']} | {row['errors']} | {row['device_hit_rate']:.1%} "
            f"| {row['unwritten_rate']:.1%} | {row['host_hit_rate']:.1%} | {row['requests_per_s']:.2f} "
            f"| {row['tokens_per_s']:.1f} "
            f"| {row['ttft_p50_s']:.2f} | {row['ttft_p99_s']:.2f} | {row['busiest_replica_vs_mean']:.2f} |"
        )
    return "\n".join(lines)


RATIOS = (  # (label, summary key, higher is better)
    ("device-slot hit rate", "device_hit_rate", True),
    ("requests without a slot write", "unwritten_rate", True),
    ("host-cache hit rate", "host_hit_rate", True),
    ("requests/s", "requests_per_s", True),
    ("TTFT p50", "ttft_p50_s", False),
    ("TTFT p99", "ttft_p99_s", False),
)


def ratios(affinity: list[Round], round_robin: list[Round], load: Workload) -> list[dict[str, float | str]]:
    """A policy ÷ round robin for each figure: over all rounds, and the lowest and highest over the ABBA pairs."""
    overall = summary(affinity, load), summary(round_robin, load)
    pairs = [(summary([a], load), summary([r], load)) for a, r in zip(affinity, round_robin, strict=True)]
    rows: list[dict[str, float | str]] = []
    for label, key, higher_better in RATIOS:
        per_pair = [float(a[key]) / float(r[key]) for a, r in pairs]
        rows.append(
            {
                "figure": label,
                "better": "higher" if higher_better else "lower",
                "ratio": float(overall[0][key]) / float(overall[1][key]),
                "pair_min": min(per_pair),
                "pair_max": max(per_pair),
            }
        )
    return rows


def ratio_table(rows: list[dict[str, float | str]], policy: str, baseline: str) -> str:
    lines = [f"| {policy} ÷ {baseline} | better when | all rounds | per ABBA pair (min – max) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['figure']} | {row['better']} | {row['ratio']:.2f}× "
            f"| {row['pair_min']:.2f}× – {row['pair_max']:.2f}× |"
        )
    return "\n".join(lines)


def schedule(names: Sequence[str], rounds: int) -> list[str]:
    """ABBA...: ``rounds`` blocks of all the policies, every other block reversed, so each policy gets the same
    share of early and late rounds (drift on a shared machine cancels)."""
    return [name for block in range(rounds) for name in (names if block % 2 == 0 else names[::-1])]


def baseline(policy: str, ran: Sequence[str]) -> str | None:
    """What ``policy`` is compared with: vLLM's router's own round robin where it ran (for its other policies),
    else HAProxy's."""
    if policy == BASELINES[0]:
        return None
    own = BASELINES[1] if policy.startswith(VLLM_ROUTER) and policy != BASELINES[1] and BASELINES[1] in ran else None
    return own or (BASELINES[0] if BASELINES[0] in ran else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Workload()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--quick", action="store_true", help="1 round of 40 requests per policy and popularity")
    args = parser.parse_args()
    values = {name: getattr(args, name) for name in asdict(defaults)}
    if args.quick:
        values |= {"requests": 40, "rounds": 1}
    load = Workload(**values)
    popularities = load.popularities.split(",")
    cpus = [int(cpu) for cpu in load.cpus.split(",") if cpu]
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as scratch:
        root = Path(scratch) / "adapters"
        root.mkdir()
        adapter_bytes = write_adapters(root, load)
        flags = (
            f"--adapters.device-slots={load.device_slots}",
            f"--adapters.host-bytes={load.host_adapters * adapter_bytes + (1 << 20)}",
            f"--adapters.fetch-latency-ms={load.fetch_latency_ms}",
            f"--adapters.fetch-bytes-per-s={int(load.fetch_mb_per_s * 1e6)}",
            f"--engine.max-running={load.max_running}",
        )
        miss_s = load.fetch_latency_ms / 1e3 + adapter_bytes / (load.fetch_mb_per_s * 1e6)
        print(
            f"{load}\nadapter size {adapter_bytes / 2**20:.1f} MiB, a host miss waits {miss_s * 1e3:.0f} ms for the "
            f"store; starting {load.replicas} replicas on CPUs {cpus or 'any'}",
            flush=True,
        )
        results: dict[str, dict[str, list[Round]]] = {}
        with running_replicas(load.replicas, Path(scratch), [root], *flags, cpus=cpus) as replicas:
            urls = [metrics_url(replica) for replica in replicas]
            # Unmeasured: the replicas' first requests (lazy initialisation) would otherwise land on round 0 alone.
            warm = trace(load, "uniform")[: 4 * load.concurrency]
            run_round(replicas, urls, str(Balance.ROUND_ROBIN), warm_up_round(load), warm, load, Path(scratch))
            round_index = 0
            for popularity in popularities:
                requests = trace(load, popularity)
                rounds = results[popularity] = defaultdict(list)
                for policy in schedule(policies(load), load.rounds):
                    result = run_round(replicas, urls, policy, round_index, requests, load, Path(scratch))
                    rounds[policy].append(result)
                    loads.append(os.getloadavg()[0])
                    print(
                        f"round {round_index} {popularity} {policy}: {len(result.ttft)} requests in "
                        f"{result.seconds:.1f} s, device hit rate {hit_rate(result.cache, 'device'):.1%}, "
                        f"per replica {result.per_replica}, load average {loads[-1]:.1f}",
                        flush=True,
                    )
                    round_index += 1
    report: dict[str, object] = {"workload": asdict(load), "load_average": loads}
    for popularity, rounds in results.items():
        rows = [summary(rounds[policy], load) for policy in policies(load)]
        print(f"\n{popularity} popularity\n\n{table(rows)}")
        compared: dict[str, list[dict[str, float | str]]] = {}
        for policy in policies(load):
            if (against := baseline(policy, policies(load))) is not None:
                compared[policy] = ratios(rounds[policy], rounds[against], load)
                print(f"\n{ratio_table(compared[policy], policy, against)}")
        report[popularity] = {"results": rows, "ratios": compared}
    print(f"\nload average (1 min) before and after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
