"""A Locust user that speaks gRPC: Locust has none built in, so this one wraps :class:`loraplex.client.Client` and
fires Locust's ``request`` event once per call (a stream fires twice: its time to first token and its end to end).

gRPC must be told about gevent before any channel exists: importing this module does that
(``grpc.experimental.gevent.init_gevent()``), after Locust's own gevent monkey-patching. Blocking calls of the sync
client then yield to other users' greenlets instead of blocking the process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Unpack

import grpc.experimental.gevent as grpc_gevent
from locust import User

from loadtests.entries import E2E_SUFFIX, TTFT_SUFFIX
from loraplex.client import Client, Generation, StreamChunk
from loraplex.client.types import GenerateOptions

grpc_gevent.init_gevent()

REQUEST_TYPE = "grpc"


class CheckFailed(Exception):
    """A call succeeded on the wire but its answer is wrong (e.g. a sticky route moved a user)."""


@dataclass
class Call:
    """What a timed call reports: ``length`` becomes Locust's response length (bytes of generated text)."""

    length: int = 0


class Timed:
    """``with user.timed(name) as call:`` fires one request event when the block ends; an ``Exception`` inside it
    becomes the call's failure and is swallowed (every failure is a data point, never a crash of the user)."""

    def __init__(self, user: GrpcUser, name: str) -> None:
        self.user, self.name, self.call = user, name, Call()
        self.started = 0.0

    def __enter__(self) -> Call:
        self.started = time.perf_counter()
        return self.call

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        if error is not None and not isinstance(error, Exception):
            return False  # GreenletExit, KeyboardInterrupt: let them stop the user
        self.user.fire(self.name, self.started, self.call.length, error)
        return error is not None


@dataclass(frozen=True)
class StreamResult:
    text: str
    last: StreamChunk


class GrpcUser(User):
    """Base class: one :class:`Client` per user on ``--host`` (host:port); subclasses add tasks."""

    abstract = True
    request_timeout: ClassVar[float] = 120.0
    generated_tokens: ClassVar[int] = 0  # all users of this process together, for the end-of-run summary
    client: Client

    def on_start(self) -> None:
        if not self.host:
            raise ValueError("set the server's gRPC address with --host HOST:PORT")
        self.client = Client(self.host.removeprefix("grpc://"), timeout=self.request_timeout)

    def on_stop(self) -> None:
        self.client.close()

    def fire(self, name: str, started: float, length: int = 0, exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

    def timed(self, name: str) -> Timed:
        """Times the block as one call named ``name``; an exception inside it is recorded as the call's failure."""
        return Timed(self, name)

    def generate(self, name: str, prompt: str, **options: Unpack[GenerateOptions]) -> Generation | None:
        """A unary Generate recorded as ``name``; None when it failed (already recorded)."""
        result: Generation | None = None
        with self.timed(name) as call:
            result = self.client.generate(prompt, **options)
            call.length = len(result.text.encode())
            GrpcUser.generated_tokens += result.usage.completion_tokens
        return result

    def stream(self, name: str, prompt: str, **options: Unpack[GenerateOptions]) -> StreamResult | None:
        """A GenerateStream recorded twice: ``name + " ttft"`` at its first message and ``name + " e2e"`` at its
        end. A stream that fails before its first message fails both entries; None when it failed."""
        started = time.perf_counter()
        first_seen = False
        parts: list[str] = []
        last: StreamChunk | None = None
        try:
            for chunk in self.client.stream(prompt, **options):
                if not first_seen:
                    first_seen = True
                    self.fire(name + TTFT_SUFFIX, started)
                parts.append(chunk.text)
                last = chunk
            if last is None or last.usage is None:
                raise CheckFailed("the stream ended without its final message (usage)")
        except Exception as error:
            if not first_seen:
                self.fire(name + TTFT_SUFFIX, started, 0, error)
            self.fire(name + E2E_SUFFIX, started, len("".join(parts).encode()), error)
            return None
        text = "".join(parts)
        self.fire(name + E2E_SUFFIX, started, len(text.encode()))
        GrpcUser.generated_tokens += last.usage.completion_tokens
        return StreamResult(text, last)
