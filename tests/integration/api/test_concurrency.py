"""Many streams at once: 200 concurrent streams over 20 adapters each get exactly their own adapter's output."""

from __future__ import annotations

import asyncio
import time

import grpc

from loraplex.client import AsyncClient, Client
from tests.integration.api.helpers import ADAPTERS, PROMPT, wait_until_idle
from tests.support.server_process import ServerProcess

STREAMS_PER_ADAPTER = 10
NEW_TOKENS = 8


def test_200_concurrent_streams_across_20_adapters_get_their_adapters_output(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    with Client(server.target) as client:
        expected = {
            adapter_id: client.generate(PROMPT, adapter=adapter_id, max_new_tokens=NEW_TOKENS).token_ids
            for adapter_id in ADAPTERS
        }
    assert len(set(expected.values())) == len(ADAPTERS)  # every adapter answers differently

    async def one(aclient: AsyncClient, adapter_id: str) -> tuple[str, tuple[int, ...], str | None]:
        tokens: list[int] = []
        last = None
        async for chunk in aclient.stream(PROMPT, adapter=adapter_id, max_new_tokens=NEW_TOKENS):
            tokens += chunk.token_ids
            last = chunk.served_by.adapter_id if chunk.served_by else last
        return adapter_id, tuple(tokens), last

    async def all_streams() -> list[tuple[str, tuple[int, ...], str | None]]:
        async with AsyncClient(server.target, timeout=300) as aclient:
            jobs = [one(aclient, a) for _ in range(STREAMS_PER_ADAPTER) for a in ADAPTERS]
            return list(await asyncio.gather(*jobs))

    started = time.monotonic()
    results = asyncio.run(all_streams())
    elapsed = time.monotonic() - started
    assert len(results) == STREAMS_PER_ADAPTER * len(ADAPTERS) == 200
    wrong = [(a, tokens) for a, tokens, _ in results if tokens != expected[a]]
    assert not wrong, f"{len(wrong)} streams got another output, e.g. {wrong[:3]}"
    assert all(served == a for a, _, served in results)
    assert wait_until_idle(channel) == 0
    print(f"200 streams x {NEW_TOKENS} tokens over 20 adapters in {elapsed:.1f} s")
