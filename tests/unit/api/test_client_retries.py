"""Client retries against a stand-in server that fails on demand (the one fault the real server cannot produce on
cue): UNAVAILABLE is retried with backoff within the deadline, nothing else is, and a stream only before its first
message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from loraplex.client import AsyncClient, Client, NotFoundError, RetryPolicy, UnavailableError
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc

Serve = Callable[["Flaky"], str]  # starts a stand-in server, returns its address
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


@dataclass
class Flaky(generation_pb2_grpc.GenerationServicer):
    """Fails the first ``failures`` calls with ``code``; a stream can also break after its first message."""

    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    break_stream: bool = False
    calls: int = 0
    tokens: list[str] = field(default_factory=list)

    def _attempt(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        self.tokens += [value for key, value in context.invocation_metadata() if key == "authorization"]
        if self.calls <= self.failures:
            context.abort(self.code, f"failure {self.calls}")

    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        self._attempt(context)
        return generation_pb2.GenerateResponse(
            text="ok", token_ids=[7], finish_reason=generation_pb2.FINISH_REASON_STOP
        )

    def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.GenerateStreamResponse]:
        self._attempt(context)
        yield generation_pb2.GenerateStreamResponse(text="a", token_ids=[1])
        if self.break_stream:
            context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")
        yield generation_pb2.GenerateStreamResponse(finish_reason=generation_pb2.FINISH_REASON_STOP)


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[grpc.Server] = []

    def start(servicer: Flaky) -> str:
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_unavailable_is_retried_until_it_succeeds(serve: Serve) -> None:
    flaky = Flaky(failures=2)
    with Client(serve(flaky), retry=FAST, token="secret-token") as client:
        assert client.generate("hi").text == "ok"
    assert flaky.calls == 3 and flaky.tokens == ["Bearer secret-token"] * 3


def test_other_codes_are_not_retried(serve: Serve) -> None:
    flaky = Flaky(failures=5, code=grpc.StatusCode.NOT_FOUND)
    with Client(serve(flaky), retry=FAST) as client, pytest.raises(NotFoundError, match="failure 1"):
        client.generate("hi")
    assert flaky.calls == 1


def test_retries_stop_after_the_last_attempt(serve: Serve) -> None:
    flaky = Flaky(failures=99)
    with Client(serve(flaky), retry=FAST) as client, pytest.raises(UnavailableError, match="failure 4"):
        client.generate("hi")
    assert flaky.calls == FAST.max_attempts


def test_retries_stop_before_the_deadline(serve: Serve) -> None:
    flaky = Flaky(failures=99)
    slow = RetryPolicy(max_attempts=10, initial_backoff=0.2, max_backoff=0.2)
    started = time.monotonic()
    with Client(serve(flaky), retry=slow, timeout=0.5) as client, pytest.raises(UnavailableError):
        client.generate("hi")
    assert time.monotonic() - started < 0.7 and 2 <= flaky.calls <= 5


def test_a_stream_is_retried_only_before_its_first_message(serve: Serve) -> None:
    flaky = Flaky(failures=2)
    with Client(serve(flaky), retry=FAST) as client:
        assert [c.text for c in client.stream("hi")] == ["a", ""]
    assert flaky.calls == 3
    broken = Flaky(break_stream=True)
    with Client(serve(broken), retry=FAST) as client:
        chunks = client.stream("hi")
        assert next(chunks).text == "a"
        with pytest.raises(UnavailableError, match="went away mid-stream"):
            next(chunks)
    assert broken.calls == 1


def test_the_async_client_retries_too(serve: Serve) -> None:
    flaky = Flaky(failures=1)
    target = serve(flaky)

    async def scenario() -> tuple[str, list[str]]:
        async with AsyncClient(target, retry=FAST) as client:
            return (await client.generate("hi")).text, [c.text async for c in client.stream("hi")]

    assert asyncio.run(scenario()) == ("ok", ["a", ""])
    assert flaky.calls == 3


@pytest.mark.parametrize("retry", [1, 2, 3, 8])
def test_backoff_grows_with_jitter_up_to_its_cap(retry: int) -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0)
    ceiling = min(0.5, 0.1 * 2 ** (retry - 1))
    assert all(ceiling / 2 <= policy.backoff(retry) <= ceiling for _ in range(50))
