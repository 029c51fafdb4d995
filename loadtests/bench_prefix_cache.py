"""The prefix cache through the real server: chat requests sharing a long system prompt, with the cache and without.

Two real ``loraplex-server`` processes (embedded base, 8 of ``bench_server``'s *light* adapters, pinned) run side
by side, one with ``engine.prefix_cache`` on and one with it off; only one is loaded at a time. A *block* is
``--requests`` (64) streamed gRPC chat requests (``chat_stream``), request i on adapter i % 8, ``--in-flight`` (16)
outstanding, greedy, exactly ``--new-tokens`` (16) tokens each (``ignore_eos``). Two workloads:

  shared   every request of a block carries the block's own system prompt of ``--system-tokens`` (512) tokens and a
           short question of its own: with the cache, each adapter prefills the system prompt once per block
  unique   every request has a system prompt of its own (nothing to reuse): what the cache costs when it never hits

Blocks run A B B A (on, off, off, on) per workload and ``--rounds``, every block with fresh system prompts, so every
block starts cold and drift on a shared machine falls on both servers alike. Per server and workload: p50 / p90
client TTFT (send → first chunk with text) and throughput (generated tokens / summed block seconds); the ratios are
on ÷ off; the hit ratio is the servers' ``loraplex_prefix_cache_hit_tokens_total`` over the prompt tokens looked up.

    python loadtests/bench_prefix_cache.py                          # ~10 minutes on 2 cores
    python loadtests/bench_prefix_cache.py --rounds 1 --requests 16  # a smoke run
    python loadtests/bench_prefix_cache.py --workloads unique        # only the no-hit pair (~8 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the server launcher shared with the integration tests

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from loadtests.bench_server import options, prepare_adapters  # noqa: E402
from loadtests.run_loadtest import embedded_shape  # noqa: E402
from loadtests.workload import prompt_text  # noqa: E402
from loraplex.client import AsyncClient  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

ADAPTERS = 8
TIMEOUT_S = 600.0
WORKLOADS = ("shared", "unique")
METRICS_LOG = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


@dataclass(frozen=True)
class Sample:
    ttft: float
    tokens: int


@dataclass
class Figures:
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.seconds

    def ttft_ms(self, q: int) -> float:
        return statistics.quantiles([s.ttft * 1e3 for s in self.samples], n=10)[q // 10 - 1]


@dataclass
class Result:
    figures: dict[tuple[str, bool], Figures]  # (workload, cache on) -> figures
    hits: dict[str, tuple[float, float]]  # workload -> (hit tokens, prompt tokens looked up) of the cache-on server


def abba(rounds: int) -> list[bool]:
    """The block order per workload: on, off, off, on per round (True = the cache on)."""
    return [True, False, False, True] * rounds


async def fit_words(client: AsyncClient, tokens: int, rng: random.Random) -> str:
    """Plain words whose tokenization is ``tokens`` long or a word over (binary search on the word count)."""
    low, high = 1, tokens
    words = [prompt_text(1, rng) for _ in range(high)]
    while low < high:
        middle = (low + high) // 2
        if (await client.tokenize(" ".join(words[:middle]))).count < tokens:
            low = middle + 1
        else:
            high = middle
    return " ".join(words[:low])


async def chats(
    client: AsyncClient, workload: str, block: int, count: int, system_tokens: int
) -> list[list[dict[str, str]]]:
    """The block's requests: a system prompt (the block's own, or each request's) and a short question."""
    shared = await fit_words(client, system_tokens, random.Random(block))
    requests = []
    for index in range(count):
        if workload == "shared":
            system = shared
        else:
            system = await fit_words(client, system_tokens, random.Random(block * 100_000 + index + 1))
        question = f"Question {index}: " + prompt_text(8, random.Random(-1 - index))
        requests.append([{"role": "system", "content": system}, {"role": "user", "content": question}])
    return requests


async def run_block(
    client: AsyncClient, requests: Sequence[list[dict[str, str]]], ids: Sequence[str], args: argparse.Namespace
) -> tuple[list[Sample], float]:
    queue = list(enumerate(requests))[::-1]
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            index, chat = queue.pop()
            started, first, tokens = time.perf_counter(), 0.0, 0
            async for chunk in client.chat_stream(chat, **options(ids[index % len(ids)], args.new_tokens)):
                if chunk.text and not first:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            samples.append(Sample(first - started, tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    return samples, time.perf_counter() - started


def prefix_counts(url: str) -> tuple[float, float]:
    """(hit tokens, prompt tokens looked up) from a server's /metrics."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {"loraplex_prefix_cache_hit_tokens_total": 0.0, "loraplex_prefix_cache_prompt_tokens_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found["loraplex_prefix_cache_hit_tokens_total"], found["loraplex_prefix_cache_prompt_tokens_total"]


async def bench(servers: dict[bool, ServerProcess], ids: Sequence[str], args: argparse.Namespace) -> Result:
    result = Result({(workload, on): Figures() for workload in WORKLOADS for on in (True, False)}, {})
    clients = {on: AsyncClient(server.target, timeout=TIMEOUT_S) for on, server in servers.items()}
    urls = {
        on: f"http://127.0.0.1:{server.wait_for_log(METRICS_LOG).group(2)}/metrics" for on, server in servers.items()
    }
    try:
        for client in clients.values():  # warm-up: every adapter pinned and served once
            await asyncio.gather(*(client.load_adapter(adapter_id, pin=True) for adapter_id in ids))
            warm = await chats(client, "shared", -1, ADAPTERS, args.system_tokens)
            await run_block(client, warm, ids, args)
        block = 0
        for workload in args.workloads:
            before = prefix_counts(urls[True])
            for on in abba(args.rounds):
                block += 1
                requests = await chats(clients[on], workload, block, args.requests, args.system_tokens)
                samples, seconds = await run_block(clients[on], requests, ids, args)
                result.figures[workload, on].samples += samples
                result.figures[workload, on].seconds += seconds
                print(f"  {workload} cache {'on ' if on else 'off'}: {seconds:6.2f} s", flush=True)
            after = prefix_counts(urls[True])
            result.hits[workload] = (after[0] - before[0], after[1] - before[1])
    finally:
        for client in clients.values():
            await client.close()
    return result


def report(result: Result) -> str:
    rows = [
        "| workload | cache | requests | tok/s | TTFT p50 / p90 (ms) | hit tokens / prompt tokens |",
        "|---|---|---:|---:|---|---|",
    ]
    ratios = []
    for workload in result.hits:  # the workloads that ran, in their order
        on, off = result.figures[workload, True], result.figures[workload, False]
        hit, looked_up = result.hits[workload]
        for name, value in (("on", on), ("off", off)):
            share = f"{hit:.0f} / {looked_up:.0f} ({hit / looked_up:.0%})" if name == "on" and looked_up else ""
            rows.append(
                f"| {workload} | {name} | {len(value.samples)} | {value.tokens_per_s:.1f} "
                f"| {value.ttft_ms(50):.0f} / {value.ttft_ms(90):.0f} | {share} |"
            )
        ratios.append(
            f"{workload}: throughput on/off {on.tokens_per_s / off.tokens_per_s:.3f}x, "
            f"p50 TTFT on/off {on.ttft_ms(50) / off.ttft_ms(50):.3f}x"
        )
    return "\n".join([*rows, "", *ratios])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds per workload (4 blocks each)")
    parser.add_argument("--requests", type=int, default=64, help="requests per block")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument(
        "--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="run only these (in this order)"
    )
    args = parser.parse_args(argv)
    root, ids = prepare_adapters("light", embedded_shape(), ADAPTERS)
    flags = (f"--adapters.device-slots={ADAPTERS + 1}", "--engine.max-queue=4096")
    with (
        tempfile.TemporaryDirectory() as scratch,
        ServerProcess.start(Path(scratch) / "on.log", [root], *flags) as on,
        ServerProcess.start(Path(scratch) / "off.log", [root], *flags, "--engine.prefix-cache=false") as off,
    ):
        result = asyncio.run(bench({True: on, False: off}, ids, args))
        on.stop()
        off.stop()
    print(report(result))


if __name__ == "__main__":
    main()
