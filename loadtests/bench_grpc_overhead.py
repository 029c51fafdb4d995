"""gRPC layer overhead: how much server-side time a request spends outside the engine, p50/p99.

Every response carries ``timings.total_seconds`` (the RPC arrived at the servicer → its last message was built) and
``timings.engine_seconds`` (the engine accepted the request → it finished). Their difference is the API layer's own
time on the server: protobuf → engine types, auth and routing checks, tokenization, the engine→event-loop hand-off
of every token, and building the response messages. The client-side view (round trip minus engine time) adds the
client, both gRPC stacks and loopback; a health check round trip is the floor of the stack itself. A baseline
measured the same way in-process, on the engine's own asyncio API with no gRPC at all, shows how much of the
overhead is the engine boundary (submit's set-up before the engine's clock starts, the thread hand-off after it
stops) rather than the API layer.

Starts the real server (embedded base, a few synthetic adapters) on a free loopback port, or uses ``--target``.

    python loadtests/bench_grpc_overhead.py            # ~3 minutes on 2 cores
    python loadtests/bench_grpc_overhead.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the server launcher shared with the integration tests

from loadtests.synthetic_adapters import write_adapter  # noqa: E402
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402
from loraplex.server.config import default_cache_dir, load_settings  # noqa: E402
from loraplex.server.core.shape import ModelShape  # noqa: E402
from loraplex.server.core.types import Finished, GenerationRequest, SamplingParams  # noqa: E402
from loraplex.server.engine.engine import Engine  # noqa: E402
from loraplex.server.model.embedded import resolve_model_dir  # noqa: E402
from loraplex.server.model.loader import load_base  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

PROMPT = "Summarise in one sentence: the quick brown fox jumps over the lazy dog near the river bank."
ADAPTERS = ("bench-a", "bench-b", "bench-c", "bench-d")


@dataclass(frozen=True)
class Scenario:
    name: str
    streaming: bool
    new_tokens: int
    concurrency: int
    requests: int
    adapters: bool = False


@dataclass
class Sample:
    server_overhead: float  # total - engine, server side
    client_overhead: float  # client round trip - engine
    engine: float


def _request(scenario: Scenario, index: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=PROMPT,
        adapter_id=ADAPTERS[index % len(ADAPTERS)] if scenario.adapters else "",
        sampling=generation_pb2.SamplingParameters(max_new_tokens=scenario.new_tokens, ignore_eos=True),
    )


async def _one(stub: generation_pb2_grpc.GenerationStub, scenario: Scenario, index: int) -> Sample:
    started = time.perf_counter()
    if scenario.streaming:
        timings = None
        async for message in stub.GenerateStream(_request(scenario, index)):
            timings = message.timings if message.HasField("timings") else timings
        assert timings is not None
    else:
        timings = (await stub.Generate(_request(scenario, index))).timings
    elapsed = time.perf_counter() - started
    return Sample(
        server_overhead=timings.total_seconds - timings.engine_seconds,
        client_overhead=elapsed - timings.engine_seconds,
        engine=timings.engine_seconds,
    )


async def _run(channel: grpc.aio.Channel, scenario: Scenario) -> list[Sample]:
    stub = generation_pb2_grpc.GenerationStub(channel)
    for index in range(min(8, scenario.requests)):  # warm-up: adapters loaded, caches hot
        await _one(stub, scenario, index)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(scenario.requests):
        queue.put_nowait(index)
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            samples.append(await _one(stub, scenario, queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    return samples


def engine_baseline(count: int) -> list[Sample]:
    """Outside-engine time of unary 1-token requests through ``Engine.generate`` in this process, no gRPC."""
    settings = load_settings(environ={}, overrides={"engine": {"kv_cache_tokens": 4096}})
    engine = Engine(load_base(settings.model), settings)
    engine.start()

    async def run() -> list[Sample]:
        samples: list[Sample] = []
        for index in range(count + 8):
            request = GenerationRequest(
                request_id=f"baseline-{index}",
                prompt=PROMPT,
                sampling=SamplingParams(max_new_tokens=1, ignore_eos=True),
            )
            started = time.monotonic()
            async for event in engine.generate(request):
                if isinstance(event, Finished) and index >= 8:  # the first 8 warm up
                    outside = time.monotonic() - started - event.timings.total
                    samples.append(Sample(outside, outside, event.timings.total))
        return samples

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


async def _round_trips(channel: grpc.aio.Channel, count: int) -> list[float]:
    health = health_pb2_grpc.HealthStub(channel)
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        await health.Check(health_pb2.HealthCheckRequest())
        times.append(time.perf_counter() - started)
    return times


def _ms(values: list[float], q: float) -> str:
    return f"{np.percentile(np.array(values) * 1e3, q):.2f}"


def _print_table(rows: list[tuple[Scenario, list[Sample]]], health: list[float], baseline: list[Sample]) -> None:
    print(
        "| scenario | requests | server overhead p50 / p99 (ms) | client-seen overhead p50 / p99 (ms) "
        "| engine time p50 (ms) |"
    )
    print("|---|---|---|---|---|")
    for scenario, samples in rows:
        server = [s.server_overhead for s in samples]
        client = [s.client_overhead for s in samples]
        engine = [s.engine for s in samples]
        print(
            f"| {scenario.name} | {len(samples)} | {_ms(server, 50)} / {_ms(server, 99)} "
            f"| {_ms(client, 50)} / {_ms(client, 99)} | {_ms(engine, 50)} |"
        )
    print(f"| health check round trip (gRPC floor) | {len(health)} | | {_ms(health, 50)} / {_ms(health, 99)} | |")
    outside = [s.server_overhead for s in baseline]
    engine = [s.engine for s in baseline]
    print(
        f"| baseline: Engine.generate in-process, no gRPC, 1 token | {len(baseline)} | {_ms(outside, 50)} / "
        f"{_ms(outside, 99)} | | {_ms(engine, 50)} |"
    )


def scenarios(quick: bool) -> list[Scenario]:
    scale = 3 if quick else 1
    return [
        Scenario("Generate, 1 token, 1 at a time", False, 1, 1, 300 // scale),
        Scenario("Generate, 16 tokens, 1 at a time", False, 16, 1, 90 // scale),
        Scenario("GenerateStream, 16 tokens, 1 at a time", True, 16, 1, 90 // scale),
        Scenario("GenerateStream, 16 tokens, 16 at once, 4 adapters", True, 16, 16, 320 // scale, adapters=True),
    ]


async def bench(target: str, quick: bool) -> tuple[list[tuple[Scenario, list[Sample]]], list[float]]:
    async with grpc.aio.insecure_channel(target) as channel:
        rows = [(scenario, await _run(channel, scenario)) for scenario in scenarios(quick)]
        health = await _round_trips(channel, 300 if quick else 1000)
    return rows, health


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a third of the requests")
    parser.add_argument("--target", help="host:port of a running server (its adapter root must hold bench-a..d)")
    args = parser.parse_args()
    baseline = engine_baseline(100 if args.quick else 300)
    if args.target:
        rows, health = asyncio.run(bench(args.target, args.quick))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch) / "adapters"
            shape = ModelShape.from_config(
                AutoConfig.from_pretrained(resolve_model_dir("embedded", default_cache_dir()))
            )
            for seed, adapter_id in enumerate(ADAPTERS):
                write_adapter(root / adapter_id, shape, rank=8, seed=seed)
            with ServerProcess.start(Path(scratch) / "server.log", [root]) as server:
                rows, health = asyncio.run(bench(server.target, args.quick))
                server.stop()
    _print_table(rows, health, baseline)


if __name__ == "__main__":
    main()
