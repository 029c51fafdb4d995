"""The client names each generation call's route (or adapter) in the ``x-loraplex-affinity`` header that the
scale-out proxies hash on; base-model calls and non-generation calls send none."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from loraplex.client import AsyncClient, ChatMessage, Client
from loraplex.client.affinity import AFFINITY_HEADER, affinity_key
from loraplex.client.types import GenerateOptions
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc

CASES: list[tuple[GenerateOptions, str | None]] = [
    ({"adapter": "support-v2"}, "support-v2"),
    ({"route": "support"}, "support"),
    ({"route": "support", "adapter": "support-v2"}, "support"),  # a route keeps all its variants together
    ({}, None),  # the base model: no header, the proxy spreads these freely
    ({"adapter": "naïve"}, None),  # not printable ASCII: cannot travel as metadata
]
CHAT = [ChatMessage(role="user", content="hi")]


class Recorder(generation_pb2_grpc.GenerationServicer):
    """Answers every generation call at once and remembers the affinity header it carried (None when absent)."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.tokens: list[str] = []

    def _record(self, context: grpc.ServicerContext) -> None:
        metadata = [(key, str(value)) for key, value in context.invocation_metadata()]
        values = [value for key, value in metadata if key == AFFINITY_HEADER]
        assert len(values) <= 1
        self.seen.append(values[0] if values else None)
        self.tokens += [value for key, value in metadata if key == "authorization"]

    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        self._record(context)
        return generation_pb2.GenerateResponse(text="ok", finish_reason=generation_pb2.FINISH_REASON_STOP)

    def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.GenerateStreamResponse]:
        self._record(context)
        yield generation_pb2.GenerateStreamResponse(text="ok", finish_reason=generation_pb2.FINISH_REASON_STOP)

    def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        self._record(context)
        return generation_pb2.TokenizeResponse(token_ids=[1])


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[Recorder, str]]:
    servicer = Recorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.parametrize(("options", "expected"), CASES)
def test_affinity_key(options: GenerateOptions, expected: str | None) -> None:
    assert affinity_key(options) == expected


@pytest.mark.parametrize(("options", "expected"), CASES)
def test_every_blocking_generation_call_sends_the_header(
    recorder: tuple[Recorder, str], options: GenerateOptions, expected: str | None
) -> None:
    servicer, target = recorder
    servicer.seen.clear()
    with Client(target, timeout=10) as client:
        client.generate("p", **options)
        client.chat(CHAT, **options)
        list(client.stream("p", **options))
        list(client.chat_stream(CHAT, **options))
        client.tokenize("p")
    assert servicer.seen == [expected] * 4 + [None]


@pytest.mark.parametrize(("options", "expected"), CASES)
def test_every_asyncio_generation_call_sends_the_header(
    recorder: tuple[Recorder, str], options: GenerateOptions, expected: str | None
) -> None:
    servicer, target = recorder
    servicer.seen.clear()

    async def calls() -> None:
        async with AsyncClient(target, timeout=10) as client:
            await client.generate("p", **options)
            await client.chat(CHAT, **options)
            await drain(client.stream("p", **options))
            await drain(client.chat_stream(CHAT, **options))
            await client.tokenize("p")

    asyncio.run(calls())
    assert servicer.seen == [expected] * 4 + [None]


async def drain(chunks: AsyncIterator[Any]) -> None:
    async for _ in chunks:
        pass


def test_the_token_still_travels_beside_the_header(recorder: tuple[Recorder, str]) -> None:
    servicer, target = recorder
    servicer.seen.clear()
    servicer.tokens.clear()
    with Client(target, timeout=10, token="secret") as client:
        client.generate("p", adapter="a1")
    assert servicer.seen == ["a1"]
    assert servicer.tokens == ["Bearer secret"]
