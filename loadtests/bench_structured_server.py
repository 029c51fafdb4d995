"""Structured output's cost per token through the real server: the same greedy requests free, constrained by a JSON
schema and by a regex, ``--in-flight`` (32) outstanding, in palindromic blocks on one server.

One ``loraplex-server`` (embedded base, no adapter) serves every block. Every request is the same prompt of exactly
``--prompt-tokens`` tokens (``bench_server.fit_prompt``), greedy, ``ignore_eos``, ``--new-tokens`` new tokens, through
the project's ``AsyncClient`` (gRPC ``Generate``, whose constraint the engine applies as for every API). The
constraints cannot be complete within that many tokens (an array of at least 200 objects; at least 2,000 letters),
so a constrained row also decodes to its length limit and every batch stays full: the modes differ only in the
mask work (llguidance's fill on the engine's step, the bool mask, the ``-inf`` fill) and in the tokens the grammar
lets the model pick. Blocks of ``--requests`` requests run in the order free, json_schema, regex, regex, json_schema,
free (``--rounds`` times), so drift on a shared machine falls on every mode alike.

Per mode: tok/s = generated tokens / summed block wall seconds; the per-token step time is the server-side
inter-token latency, p50 of ``(engine - TTFT) / (tokens - 1)`` per request (one engine step per token at a full
batch), and TTFT p50. The ratios are constrained ÷ free.

    python loadtests/bench_structured_server.py                           # ~4 minutes on 2 cores
    python loadtests/bench_structured_server.py --rounds 1 --requests 32  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*, tests.support: the launcher and helpers shared with the tests

from loadtests.bench_server import TIMEOUT_S, PhaseResult, Sample, fit_prompt, run_requests, server_count  # noqa: E402
from loraplex.client import AsyncClient  # noqa: E402
from loraplex.client.types import GenerateOptions  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

ITEM = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}
SCHEMA = {  # at least 200 items of >= 25 characters: never complete within a few hundred tokens
    "type": "object",
    "properties": {"items": {"type": "array", "items": ITEM, "minItems": 200}},
    "required": ["items"],
    "additionalProperties": False,
}
REGEX = "[A-Za-z]+( [A-Za-z]+){2000,}"
MODES: dict[str, GenerateOptions] = {"free": {}, "json_schema": {"json_schema": SCHEMA}, "regex": {"regex": REGEX}}
WARM_REQUESTS = 4


@dataclass
class Mode:
    name: str
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def result(self) -> PhaseResult:
        return PhaseResult.of(self.name, self.samples, len(self.failures), self.seconds)


def palindrome(modes: int, rounds: int) -> list[int]:
    """The block order: 0 1 … n-1 n-1 … 1 0 per round, so each mode's blocks sit as early as late on average."""
    forward = list(range(modes))
    return (forward + forward[::-1]) * rounds


def report(modes: Sequence[Mode], new_tokens: int) -> str:
    """One row per mode (the first is the free baseline; short = requests that stopped before ``new_tokens``),
    then each constrained mode ÷ free."""
    rows = [
        "| mode | requests | failed | short | tok/s | step time per token p50 (ms) | TTFT p50 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = [mode.result() for mode in modes]
    for mode, r in zip(modes, results, strict=True):
        short = sum(1 for s in mode.samples if s.tokens < new_tokens)
        rows.append(
            f"| {r.phase} | {r.requests} | {r.failures} | {short} | {r.tokens_per_s:.1f} "
            f"| {r.itl_p50_ms or 0:.1f} | {r.ttft_p50_ms or 0:.0f} |"
        )
    free = results[0]
    for r in results[1:]:
        rate = r.tokens_per_s / free.tokens_per_s
        step = (r.itl_p50_ms or 0) / (free.itl_p50_ms or 1)
        ttft = (r.ttft_p50_ms or 0) / (free.ttft_p50_ms or 1)
        rows.append(f"| {r.phase} ÷ {free.phase} | | | | {rate:.3f} | {step:.3f} | {ttft:.3f} |")
    return "\n".join(rows)


async def bench(target: str, args: argparse.Namespace) -> list[Mode]:
    modes = [Mode(name) for name in MODES]
    async with AsyncClient(target, timeout=TIMEOUT_S) as client:
        prompt = await fit_prompt(lambda text: server_count(client, text), args.prompt_tokens)
        for name, constraint in MODES.items():  # warm-up: every constraint compiled (and cached) once
            _, errors, _ = await run_requests(client, prompt, [None] * WARM_REQUESTS, WARM_REQUESTS, 4, constraint)
            if errors:
                raise RuntimeError(f"the {name} warm-up failed: {errors[0]}")
        for which in palindrome(len(modes), args.rounds):
            mode = modes[which]
            samples, errors, seconds = await run_requests(
                client, prompt, [None] * args.requests, args.in_flight, args.new_tokens, MODES[mode.name]
            )
            mode.samples += samples
            mode.failures += errors
            mode.seconds += seconds
            rate = sum(s.tokens for s in samples) / seconds
            print(f"  {mode.name:12s} {len(samples)} requests in {seconds:6.2f} s = {rate:6.1f} tok/s", flush=True)
    return modes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="palindromic rounds (2 blocks per mode each)")
    parser.add_argument("--requests", type=int, default=64, help="requests per block")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=25)
    args = parser.parse_args(argv)
    print(f"load average at start {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as scratch:
        flags = (f"--engine.max-running={args.in_flight}", "--engine.max-queue=4096", "--engine.kv-cache-tokens=16384")
        with ServerProcess.start(Path(scratch) / "server.log", [Path(scratch)], *flags) as server:
            modes = asyncio.run(bench(server.target, args))
            server.stop()
    print(report(modes, args.new_tokens))
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
