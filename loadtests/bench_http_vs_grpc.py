"""The OpenAI-compatible HTTP API against gRPC on the same requests: tok/s, p50/p99 latency and TTFT per protocol.

One real ``loraplex-server`` (embedded base, 4 of ``bench_server``'s *light* adapters) serves both ports. Every
request is the same streamed completion: one fixed prompt, greedy, exactly ``--new-tokens`` tokens (``ignore_eos``),
request i on adapter i % 4, ``--in-flight`` outstanding. gRPC is ``GenerateStream`` through the project's
``AsyncClient``; HTTP is ``POST /v1/completions`` with ``stream: true`` (SSE) through httpx. Blocks of
``--requests`` requests alternate A B B A (``--rounds`` times), so drift on a shared machine falls on both protocols
alike. Client-side figures: latency = send → last chunk, TTFT = send → first chunk with text, tok/s = generated
tokens / summed block wall time. The ratios are HTTP ÷ gRPC.

    python loadtests/bench_http_vs_grpc.py                          # ~2-3 minutes on 2 cores
    python loadtests/bench_http_vs_grpc.py --rounds 1 --requests 16  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the server launcher shared with the integration tests

from loadtests.bench_server import options, prepare_adapters  # noqa: E402
from loadtests.run_loadtest import embedded_shape  # noqa: E402
from loraplex.client import AsyncClient  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

PROMPT = "Summarise in one sentence: the quick brown fox jumps over the lazy dog near the river bank."
ADAPTERS = 4
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Sample:
    latency: float
    ttft: float
    tokens: int


@dataclass
class Protocol:
    name: str
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0


Send = Callable[[str], Awaitable[Sample]]


def grpc_sender(client: AsyncClient, new_tokens: int) -> Send:
    async def send(adapter: str) -> Sample:
        started, first, tokens = time.perf_counter(), 0.0, 0
        async for chunk in client.stream(PROMPT, **options(adapter, new_tokens)):
            if chunk.text and not first:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return Sample(time.perf_counter() - started, first - started, tokens)

    return send


def http_sender(client: httpx.AsyncClient, new_tokens: int) -> Send:
    async def send(adapter: str) -> Sample:
        body = {
            "model": adapter,
            "prompt": PROMPT,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started, first, tokens = time.perf_counter(), 0.0, 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue  # blank separators and the closing [DONE]
                chunk = json.loads(line.removeprefix("data: "))
                if any(choice["text"] for choice in chunk["choices"]) and not first:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return Sample(time.perf_counter() - started, first - started, tokens)

    return send


async def run_block(send: Send, adapters: Sequence[str], requests: int, in_flight: int) -> tuple[list[Sample], float]:
    """``requests`` requests, ``in_flight`` outstanding; the samples and the block's wall seconds."""
    queue = [adapters[index % len(adapters)] for index in range(requests)][::-1]
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            samples.append(await send(queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return samples, time.perf_counter() - started


def abba(rounds: int) -> list[int]:
    """The block order: 0 1 1 0 per round (0 = gRPC, 1 = HTTP)."""
    return [0, 1, 1, 0] * rounds


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q))


def report(protocols: Sequence[Protocol]) -> str:
    rows = ["| protocol | requests | tok/s | latency p50 / p99 (ms) | TTFT p50 / p99 (ms) |", "|---|---:|---:|---|---|"]
    figures = []
    for protocol in protocols:
        latency = [s.latency for s in protocol.samples]
        ttft = [s.ttft for s in protocol.samples]
        rate = sum(s.tokens for s in protocol.samples) / protocol.seconds
        figures.append((rate, _ms(latency, 50), _ms(latency, 99), _ms(ttft, 50), _ms(ttft, 99)))
        rows.append(
            f"| {protocol.name} | {len(latency)} | {rate:.1f} | {figures[-1][1]:.1f} / {figures[-1][2]:.1f} "
            f"| {figures[-1][3]:.1f} / {figures[-1][4]:.1f} |"
        )
    ratios = [http / grpc for grpc, http in zip(*figures, strict=True)]
    rows.append(
        f"| HTTP ÷ gRPC | | {ratios[0]:.3f} | {ratios[1]:.3f} / {ratios[2]:.3f} | {ratios[3]:.3f} / {ratios[4]:.3f} |"
    )
    return "\n".join(rows)


async def bench(server: ServerProcess, ids: Sequence[str], args: argparse.Namespace) -> list[Protocol]:
    protocols = [Protocol("gRPC GenerateStream"), Protocol("HTTP /v1/completions SSE")]
    async with (
        AsyncClient(server.target, timeout=TIMEOUT_S) as grpc_client,
        httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as http_client,
    ):
        senders = [grpc_sender(grpc_client, args.new_tokens), http_sender(http_client, args.new_tokens)]
        for send in senders:  # warm-up: adapters resident, connections open
            await run_block(send, ids, len(ids), len(ids))
        for which in abba(args.rounds):
            samples, seconds = await run_block(senders[which], ids, args.requests, args.in_flight)
            protocols[which].samples += samples
            protocols[which].seconds += seconds
    return protocols


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds (4 blocks each)")
    parser.add_argument("--requests", type=int, default=32, help="requests per block")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    root, ids = prepare_adapters("light", embedded_shape(), ADAPTERS)
    with tempfile.TemporaryDirectory() as scratch:
        flags = (f"--adapters.device-slots={ADAPTERS + 1}", "--engine.kv-cache-tokens=8192")
        with ServerProcess.start(Path(scratch) / "server.log", [root], *flags) as server:
            protocols = asyncio.run(bench(server, ids, args))
            server.stop()
    print(report(protocols))


if __name__ == "__main__":
    main()
