"""Fair share through the real server: a light tenant's time to first token while another tenant floods it.

One ``loraplex-server`` (embedded base, no adapter, ``--max-running`` 4) with auth on and two tenants of weight 1
in its tokens file, *flood* and *light*, driven over loopback by streamed gRPC ``GenerateStream`` calls (greedy,
``ignore_eos``, exactly ``--new-tokens`` tokens). Phases, each ``--seconds`` long, on a server with
``engine.fair_share`` on and then on one with it off (first come, first served):

  capacity  ``max_running`` closed-loop flood clients: the served requests per second (on the fair server only;
            both servers are offered the same rates)
  alone     the light tenant alone, open loop at ``--light-share`` × capacity: its unloaded TTFT
  flooded   the same light load plus the flood, open loop at ``--flood-factor`` (10) × its share (capacity / 2)

Per phase: the light tenant's TTFT p50 / p99 (send → first message with tokens) and each tenant's outcomes. A
request is *refused* when it ends RESOURCE_EXHAUSTED before any token (never accepted) and *lost* when it ends any
other way than with all its tokens; the ratios are flooded ÷ alone p99 per server. ``--json`` writes the figures.

    python loadtests/bench_fairness.py                 # ~3 minutes on 2 cores
    python loadtests/bench_fairness.py --seconds 10    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the server launcher shared with the tests

from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

FLOOD_TOKEN = "fairness-flood-token-3c4d5e6f7a8b"
LIGHT_TOKEN = "fairness-light-token-9b8a7f6e5d4c"
TOKENS = {
    FLOOD_TOKEN: {"tenant": "flood", "adapters": ["base"], "weight": 1},
    LIGHT_TOKEN: {"tenant": "light", "adapters": ["base"], "weight": 1},
}
PROMPT = "Write a short poem about the sea."
TIMEOUT_S = 300.0
OK, REFUSED = "OK", "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class Sample:
    code: str  # the status code's name; OK when the stream ended normally
    ttft: float | None  # seconds to the first message with tokens (None: no token came)
    tokens: int


@dataclass
class Tally:
    samples: list[Sample] = field(default_factory=list)

    def codes(self) -> dict[str, int]:
        return dict(Counter(sample.code for sample in self.samples))

    def lost(self, new_tokens: int) -> int:
        """Requests that were not refused and did not end with all their tokens."""
        return sum(
            not (sample.code == OK and sample.tokens == new_tokens)
            and not (sample.code == REFUSED and sample.ttft is None)
            for sample in self.samples
        )

    def ttft_ms(self, share: float) -> float:
        values = sorted(s.ttft * 1e3 for s in self.samples if s.code == OK and s.ttft is not None)
        return values[min(len(values) - 1, math.ceil(share * len(values)) - 1)] if values else math.nan


@dataclass(frozen=True)
class Figures:
    """One phase's outcome for the table and the JSON."""

    light_p50_ms: float
    light_p99_ms: float
    light: dict[str, int]
    flood: dict[str, int]
    lost: int


def figures(light: Tally, flood: Tally, new_tokens: int) -> Figures:
    return Figures(
        light.ttft_ms(0.50),
        light.ttft_ms(0.99),
        light.codes(),
        flood.codes(),
        light.lost(new_tokens) + flood.lost(new_tokens),
    )


async def stream_one(stub: generation_pb2_grpc.GenerationStub, token: str, new_tokens: int, tally: Tally) -> None:
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT, sampling=generation_pb2.SamplingParameters(max_new_tokens=new_tokens, ignore_eos=True)
    )
    started, first, tokens, code = time.monotonic(), None, 0, OK
    try:
        async for message in stub.GenerateStream(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=TIMEOUT_S
        ):
            if message.token_ids and first is None:
                first = time.monotonic() - started
            tokens += len(message.token_ids)
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    tally.samples.append(Sample(code, first, tokens))


async def open_loop(target: str, token: str, rate: float, seconds: float, new_tokens: int) -> Tally:
    """Requests of ``token``'s tenant at ``rate`` per second for ``seconds``, whether or not earlier ones ended."""
    tally = Tally()
    if rate <= 0:
        return tally
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for index in range(int(rate * seconds)):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(stub, token, new_tokens, tally)))
        await asyncio.gather(*tasks)
    return tally


async def capacity(target: str, clients: int, seconds: float, new_tokens: int) -> float:
    """Requests per second that ``clients`` closed-loop flood callers get served."""
    tally = Tally()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        start = time.monotonic()

        async def caller() -> None:
            while time.monotonic() - start < seconds:
                await stream_one(stub, FLOOD_TOKEN, new_tokens, tally)

        await asyncio.gather(*(caller() for _ in range(clients)))
    return tally.codes().get(OK, 0) / (time.monotonic() - start)


async def light_alone(target: str, light_rate: float, seconds: float, new_tokens: int) -> Figures:
    light = await open_loop(target, LIGHT_TOKEN, light_rate, seconds, new_tokens)
    return figures(light, Tally(), new_tokens)


async def flooded(target: str, light_rate: float, flood_rate: float, seconds: float, new_tokens: int) -> Figures:
    light, flood = await asyncio.gather(
        open_loop(target, LIGHT_TOKEN, light_rate, seconds, new_tokens),
        open_loop(target, FLOOD_TOKEN, flood_rate, seconds, new_tokens),
    )
    return figures(light, flood, new_tokens)


@asynccontextmanager
async def fairness_server(scratch: Path, name: str, max_running: int, fair: bool) -> AsyncIterator[ServerProcess]:
    """A server with the two tenants' tokens file; warmed up by a few requests of each tenant."""
    tokens = scratch / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(TOKENS))
    flags = (
        f"--auth.tokens-file={tokens}",
        f"--engine.max-running={max_running}",
        f"--engine.fair-share={'true' if fair else 'false'}",
    )
    root = scratch / "adapters"
    root.mkdir(exist_ok=True)
    with ServerProcess.start(scratch / f"{name}.log", [root], *flags) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            warm = Tally()
            for token in (FLOOD_TOKEN, LIGHT_TOKEN) * 2:
                await stream_one(stub, token, 4, warm)
            assert warm.codes() == {OK: 4}, warm.codes()
        yield server
        server.stop()


def report(results: dict[str, dict[str, Figures]], rates: dict[str, float]) -> str:
    rows = [
        f"capacity {rates['capacity']:.2f} req/s; light {rates['light']:.2f} req/s; "
        f"flood {rates['flood']:.2f} req/s (10x its share = 5x capacity)",
        "",
        "| fair share | phase | light TTFT p50 / p99 (ms) | light outcomes | flood outcomes | lost |",
        "|---|---|---|---|---|---:|",
    ]
    ratios = []
    for mode, phases in results.items():
        for phase, value in phases.items():
            rows.append(
                f"| {mode} | {phase} | {value.light_p50_ms:.0f} / {value.light_p99_ms:.0f} | {value.light} "
                f"| {value.flood} | {value.lost} |"
            )
        alone, loaded = phases["alone"], phases["flooded"]
        ratios.append(
            f"fair share {mode}: light p99 TTFT flooded / alone {loaded.light_p99_ms / alone.light_p99_ms:.2f}x, "
            f"p50 {loaded.light_p50_ms / alone.light_p50_ms:.2f}x"
        )
    return "\n".join([*rows, "", *ratios])


async def bench(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, dict[str, Figures]], dict[str, float]]:
    results: dict[str, dict[str, Figures]] = {}
    rates: dict[str, float] = {}
    for fair in (True, False):
        mode = "on" if fair else "off"
        async with fairness_server(scratch, mode, args.max_running, fair) as server:
            if not rates:
                rates["capacity"] = await capacity(server.target, args.max_running, args.seconds, args.new_tokens)
                rates["light"] = args.light_share * rates["capacity"]
                rates["flood"] = args.flood_factor * rates["capacity"] / 2
            alone = await light_alone(server.target, rates["light"], args.seconds, args.new_tokens)
            loaded = await flooded(server.target, rates["light"], rates["flood"], args.seconds, args.new_tokens)
            results[mode] = {"alone": alone, "flooded": loaded}
            print(f"  fair share {mode}: done", flush=True)
    return results, rates


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--light-share", type=float, default=0.2, help="the light rate, a share of the capacity")
    parser.add_argument("--flood-factor", type=float, default=10.0, help="the flood rate over its share")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results, rates = asyncio.run(bench(args, Path(scratch)))
    print(report(results, rates))
    if args.json:
        data = {"rates": rates, "phases": {m: {p: asdict(f) for p, f in ph.items()} for m, ph in results.items()}}
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
