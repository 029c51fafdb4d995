"""Resilience scenario 1, overload: measure the server's capacity, then offer 4× that for a while, against the real
server process.

Capacity is measured first, in the same test (so the CPU contention of a shared machine hits both phases alike):
``engine.max_running`` closed-loop clients keep the running batch full with nothing queued; their throughput is the
capacity and their p99 latency the unloaded p99. Then an open-loop generator offers 4× that rate. Goals: the
server never dies; requests beyond the queue bound get RESOURCE_EXHAUSTED within 50 ms; admitted requests complete
with p99 ≤ 2× the unloaded p99; the server's resident memory (``VmHWM`` from ``/proc``) stays within its memory
budget: the resident size after start-up (base weights and the preallocated KV cache) plus the configured adapter
budgets (``adapters.host_bytes`` + ``adapters.device_bytes``) plus ``STEP_HEADROOM`` for one step's activations and
request state. The queue bound is the server's default (``engine.max_queue`` unset = ``engine.max_running``).

Sizes: 12 s of capacity and 15 s of overload in the test suite; 30 s and 60 s with ``LORAPLEX_RESILIENCE_FULL=1``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import cast

import grpc
import pytest

from loraplex.client import Client
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from loraplex.server.config import MIB
from tests.support.resilience import full_run, record, rss_bytes
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.resilience

MAX_RUNNING = 4
NEW_TOKENS = 8
PROMPT = "Write a short poem about the sea."
CAPACITY_S, OVERLOAD_S = (30.0, 60.0) if full_run() else (12.0, 15.0)
OVERLOAD_FACTOR = 4
REFUSAL_BUDGET_S = 0.050
ADAPTER_BYTES = 64 * MIB  # adapters.host_bytes and adapters.device_bytes of this server (no adapter is used)
STEP_HEADROOM = 256 * MIB  # logits of a full step (512 tokens × 49,152 vocab × 4 B = 96 MiB), MLP activations, state


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


@dataclass
class Outcomes:
    latencies: dict[str, list[float]] = field(default_factory=dict)  # status code name -> seconds

    def add(self, code: str, seconds: float) -> None:
        self.latencies.setdefault(code, []).append(seconds)

    def count(self, code: str) -> int:
        return len(self.latencies.get(code, []))


@pytest.fixture(scope="module")
def overload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    flags = (
        f"--engine.max-running={MAX_RUNNING}",
        f"--adapters.host-bytes={ADAPTER_BYTES}",
        f"--adapters.device-bytes={ADAPTER_BYTES}",
    )
    root = tmp_path_factory.mktemp("overload-adapters")
    log = tmp_path_factory.mktemp("overload-server") / "server.log"
    with ServerProcess.start(log, [root], *flags) as server:
        yield server
        assert server.stop() == 0, server.log()[-3000:]


async def one(stub: generation_pb2_grpc.GenerationStub, outcomes: Outcomes) -> None:
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT, sampling=generation_pb2.SamplingParameters(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    )
    started = time.monotonic()
    try:
        response = await cast(Awaitable[generation_pb2.GenerateResponse], stub.Generate(request, timeout=300))
    except grpc.aio.AioRpcError as error:
        outcomes.add(error.code().name, time.monotonic() - started)
        return
    assert response.usage.completion_tokens == NEW_TOKENS
    outcomes.add("OK", time.monotonic() - started)


async def closed_loop(target: str, clients: int, seconds: float) -> Outcomes:
    """``clients`` callers each sending the next request when the last one returns."""
    outcomes = Outcomes()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                await one(stub, outcomes)

        await asyncio.gather(*(caller() for _ in range(clients)))
    return outcomes


async def open_loop(target: str, rate: float, seconds: float) -> Outcomes:
    """Requests at ``rate`` per second for ``seconds``, whether or not earlier ones returned."""
    outcomes = Outcomes()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for index in range(int(rate * seconds)):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(stub, outcomes)))
        await asyncio.gather(*tasks)
    return outcomes


def test_four_times_capacity_is_shed_fast_and_admitted_requests_stay_fast(overload_server: ServerProcess) -> None:
    pid = overload_server.process.pid
    with Client(overload_server.target) as client:  # warm-up: first steps allocate what steady state reuses
        for _ in range(3):
            client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    idle_rss = rss_bytes(pid)
    budget = idle_rss + 2 * ADAPTER_BYTES + STEP_HEADROOM

    started = time.monotonic()
    base = asyncio.run(closed_loop(overload_server.target, MAX_RUNNING, CAPACITY_S))
    capacity = base.count("OK") / (time.monotonic() - started)
    unloaded_p99 = percentile(base.latencies["OK"], 0.99)
    assert set(base.latencies) == {"OK"}, {code: len(v) for code, v in base.latencies.items()}

    rate = OVERLOAD_FACTOR * capacity
    loaded = asyncio.run(open_loop(overload_server.target, rate, OVERLOAD_S))
    peak_rss = rss_bytes(pid, "VmHWM")
    alive = overload_server.process.poll() is None
    with Client(overload_server.target) as client:
        after = client.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        health = client.health()

    counts = {code: len(values) for code, values in loaded.latencies.items()}
    refused = loaded.latencies.get("RESOURCE_EXHAUSTED", [])
    admitted = loaded.latencies.get("OK", [])
    refusal_p99 = percentile(refused, 0.99) if refused else 0.0
    refusal_max = max(refused, default=0.0)
    admitted_p99 = percentile(admitted, 0.99) if admitted else math.inf
    offered = f"{rate:.1f} req/s for {OVERLOAD_S:.0f} s ({OVERLOAD_FACTOR}x {capacity:.2f} req/s)"
    record(1, "capacity (closed loop)", f"{capacity:.2f} req/s, p99 {unloaded_p99 * 1e3:.0f} ms", "measured", True)
    record(1, "offered", f"{offered}: {counts}", "4x capacity", True)
    record(1, "server alive, health", f"{alive}, {health}", "alive, serving", alive and health == "SERVING")
    record(
        1,
        "RESOURCE_EXHAUSTED latency",
        f"p99 {refusal_p99 * 1e3:.1f} ms, max {refusal_max * 1e3:.1f} ms ({len(refused)})",
        "p99 <= 50 ms",
        bool(refused) and refusal_p99 <= REFUSAL_BUDGET_S,
    )
    record(
        1,
        "admitted p99",
        f"{admitted_p99 * 1e3:.0f} ms = {admitted_p99 / unloaded_p99:.2f}x unloaded",
        "<= 2x unloaded p99",
        admitted_p99 <= 2 * unloaded_p99,
    )
    record(
        1,
        "peak RSS",
        f"{peak_rss / MIB:.0f} MiB (idle {idle_rss / MIB:.0f}) of {budget / MIB:.0f} MiB",
        "<= budget",
        peak_rss <= budget,
    )
    assert alive and health == "SERVING" and after.usage.completion_tokens == 4
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
    assert refused, f"4x capacity never reached the queue bound: {counts}"
    assert refusal_p99 <= REFUSAL_BUDGET_S, f"refusals took p99 {refusal_p99 * 1e3:.1f} ms"
    assert admitted_p99 <= 2 * unloaded_p99, f"admitted p99 {admitted_p99:.2f} s vs unloaded {unloaded_p99:.2f} s"
    assert peak_rss <= budget, f"peak RSS {peak_rss / MIB:.0f} MiB over the budget {budget / MIB:.0f} MiB"
