"""``AsyncClient``: the asyncio loraplex client, the same calls as :class:`loraplex.client.Client` awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client import messages, route_messages
from loraplex.client.affinity import Metadata, affinity_metadata
from loraplex.client.base import ClientBase
from loraplex.client.errors import error_from
from loraplex.client.retry import NO_RETRIES, RetryPolicy
from loraplex.client.types import (
    Adapter,
    AdapterList,
    ChatInput,
    FeedbackResult,
    GenerateOptions,
    Generation,
    Route,
    RouteReport,
    ServerStatus,
    StreamChunk,
    Tokenization,
)
from loraplex.client.uploads import UploadChunks
from loraplex.proto.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)


class AsyncClient(ClientBase):
    """A connection to one loraplex server for asyncio code; create it inside the event loop that uses it.

    Deadlines, retries (UNAVAILABLE only, with backoff) and typed exceptions work as in the blocking client.
    """

    def _bind(self) -> None:
        self._channel = self.connection.aio_channel()
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._routing = routing_pb2_grpc.RoutingStub(self._channel)
        self._server = server_pb2_grpc.ServerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout: float | None,
        retry: RetryPolicy | None = None,
        extra: Metadata = (),
    ) -> Any:
        attempts = self._attempts(timeout, retry)
        while True:
            try:
                # A request stream (an upload) is iterated afresh by every attempt.
                message = iter(request) if isinstance(request, Iterable) else request
                return await method(message, timeout=attempts.remaining(), metadata=self.connection.metadata() + extra)
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.after(error))

    async def _stream(self, request: Any, timeout: float | None, extra: Metadata = ()) -> AsyncIterator[StreamChunk]:
        """Streams; retries only until the first message arrives; closing the iterator early cancels the call."""
        attempts = self._attempts(timeout)
        while True:
            call = self._generation.GenerateStream(
                request, timeout=attempts.remaining(), metadata=self.connection.metadata() + extra
            )
            responses = aiter(call)
            try:
                first = await anext(responses, None)
                break
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.after(error))
        try:
            if first is not None:
                yield messages.stream_chunk(first)
            async for message in responses:
                yield messages.stream_chunk(message)
        except grpc.RpcError as error:
            raise error_from(error) from None
        finally:
            call.cancel()

    # ------------------------------------------------------------------------------------------------- generation

    async def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
        request = messages.generate_request(prompt, None, options)
        return messages.generation(
            await self._call(
                self._generation.Generate, request, options.get("timeout"), extra=affinity_metadata(options)
            )
        )

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamChunk]:
        request = messages.generate_request(prompt, None, options)
        return self._stream(request, options.get("timeout"), affinity_metadata(options))

    async def chat(self, chat: Sequence[ChatInput], **options: Unpack[GenerateOptions]) -> Generation:
        request = messages.generate_request(None, chat, options)
        return messages.generation(
            await self._call(
                self._generation.Generate, request, options.get("timeout"), extra=affinity_metadata(options)
            )
        )

    def chat_stream(self, chat: Sequence[ChatInput], **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamChunk]:
        request = messages.generate_request(None, chat, options)
        return self._stream(request, options.get("timeout"), affinity_metadata(options))

    async def tokenize(
        self, prompt: str | None = None, chat: Sequence[ChatInput] | None = None, timeout: float | None = None
    ) -> Tokenization:
        request = messages.tokenize_request(prompt, chat)
        return messages.tokenization(await self._call(self._generation.Tokenize, request, timeout))

    # --------------------------------------------------------------------------------------------------- routes

    async def list_routes(self, timeout: float | None = None) -> list[Route]:
        response = await self._call(self._routing.ListRoutes, routing_pb2.ListRoutesRequest(), timeout)
        return [route_messages.route(r) for r in response.routes]

    async def set_route(self, route: Route, timeout: float | None = None) -> Route:
        """Adds or replaces ``route`` (admin); the server loads its adapters first and refuses missing ones."""
        request = routing_pb2.SetRouteRequest(route=route_messages.route_message(route))
        return route_messages.route(await self._call(self._routing.SetRoute, request, timeout))

    async def delete_route(self, name: str, timeout: float | None = None) -> None:
        await self._call(self._routing.DeleteRoute, routing_pb2.DeleteRouteRequest(name=name), timeout)

    async def feedback(
        self, request_id: str, good: bool | None = None, score: float | None = None, timeout: float | None = None
    ) -> FeedbackResult:
        """Reports the outcome of a routed request: a good/bad label, a score, or both (once per request)."""
        request = route_messages.feedback_request(request_id, good, score)
        return route_messages.feedback_result(await self._call(self._routing.Feedback, request, timeout))

    async def route_report(self, route: str, timeout: float | None = None) -> RouteReport:
        """Per-variant statistics of ``route``'s current experiment, with tests against the control."""
        request = routing_pb2.GetRouteReportRequest(route=route)
        return route_messages.route_report(await self._call(self._routing.GetRouteReport, request, timeout))

    # ---------------------------------------------------------------------------------------------------- admin

    async def list_adapters(self, timeout: float | None = None, *, limit: int | None = None) -> AdapterList:
        """The adapters in memory and on the server's adapter roots, sorted by id: at most ``limit`` (default and
        cap: the server's adapters.list_limit), keeping those in memory when there are more (``truncated``)."""
        request = messages.list_request(limit)
        return messages.adapter_list(await self._call(self._adapters.ListAdapters, request, timeout))

    async def get_adapter(self, adapter_id: str, timeout: float | None = None) -> Adapter:
        request = adapters_pb2.GetAdapterRequest(adapter_id=adapter_id)
        return messages.adapter(await self._call(self._adapters.GetAdapter, request, timeout))

    async def load_adapter(self, adapter_id: str, pin: bool | None = None, timeout: float | None = None) -> Adapter:
        request = messages.load_request(adapter_id, pin)
        return messages.adapter(await self._call(self._adapters.LoadAdapter, request, timeout))

    async def upload_adapter(
        self, directory: Path, adapter_id: str, pin: bool | None = None, timeout: float | None = None
    ) -> Adapter:
        """Copies the adapter in ``directory`` onto the server as ``adapter_id`` and loads it (admin)."""
        chunks = UploadChunks(directory, adapter_id, pin)
        return messages.adapter(await self._call(self._adapters.UploadAdapter, chunks, timeout))

    async def unload_adapter(self, adapter_id: str, timeout: float | None = None) -> None:
        request = adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id)
        await self._call(self._adapters.UnloadAdapter, request, timeout)

    async def status(self, timeout: float | None = None) -> ServerStatus:
        response = await self._call(self._server.GetStatus, server_pb2.GetStatusRequest(), timeout)
        return messages.server_status(response)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status of the server ("") or one service: SERVING, NOT_SERVING, ... (no retries)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return messages.health_status(await self._call(self._health.Check, request, timeout, NO_RETRIES))
