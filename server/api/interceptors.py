"""Server interceptors: the write timeout of server streams (outermost), errors → status codes, then
authentication and admin checks.

The last two wrap the servicer's behaviour in an async context manager that runs around the whole call, streaming
or not; the first writes a streaming call's responses itself, each within ``server.stream_write_timeout_s``.
Health and reflection are left alone: probes and ``grpcurl list`` need no token. A request whose bytes are not a
valid message of the method's type (truncated, invalid UTF-8 in a string, wrong wire types) is INVALID_ARGUMENT,
raised inside the calls' context managers (after authentication) instead of gRPC's own UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from loraplex.server.api.auth import OPEN_ACCESS, TokenTable, set_current_tenant
from loraplex.server.api.errors import status_of
from loraplex.server.api.state import Context
from loraplex.server.core.errors import InvalidRequest

Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"

log = logging.getLogger(__name__)

UNGUARDED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
ADMIN_METHODS = frozenset(
    {
        "/loraplex.v1.Adapters/LoadAdapter",
        "/loraplex.v1.Adapters/UnloadAdapter",
        "/loraplex.v1.Adapters/UploadAdapter",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        "/loraplex.v1.Routing/SetRoute",
        "/loraplex.v1.Routing/DeleteRoute",
    }
)
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _service(method: str) -> str:
    return method.lstrip("/").partition("/")[0]


@dataclass(frozen=True)
class _Undecodable:
    """What the request deserializer returns for bytes that are not a valid message."""

    error: str


class _CheckedDeserializer:
    """The method's deserializer, returning :class:`_Undecodable` instead of raising (gRPC would answer UNKNOWN)."""

    def __init__(self, deserialize: Callable[[bytes], Any]) -> None:
        self._deserialize = deserialize

    def __call__(self, data: bytes) -> Any:
        try:
            return self._deserialize(data)
        except Exception as exc:  # DecodeError, or a UnicodeDecodeError from a string field
            return _Undecodable(f"{type(exc).__name__}: {exc}")


def _decoded(request: Any, method: str) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidRequest(f"the request is not a valid message for {method} ({request.error}); check the proto")
    return request


async def _decoded_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request, method)


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    around: Callable[[Context, str], AbstractAsyncContextManager[None]],
) -> Any:
    """``handler`` with its behaviour run inside ``around(context, method)``; the innermost wrapper (the first to
    wrap the deserializer) refuses undecodable requests."""
    streaming = (handler.request_streaming, handler.response_streaming)
    behavior: Any = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    deserializer = handler.request_deserializer
    checks = deserializer is not None and not isinstance(deserializer, _CheckedDeserializer)
    if checks and deserializer is not None:
        deserializer = _CheckedDeserializer(deserializer)

    def checked(request: Any) -> Any:
        if not checks:
            return request
        return _decoded_stream(request, method) if handler.request_streaming else _decoded(request, method)

    async def single(request: Any, context: Context) -> Any:
        async with around(context, method):
            return await behavior(checked(request), context)

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        async with around(context, method), aclosing(behavior(checked(request), context)) as responses:
            async for response in responses:
                yield response

    return _FACTORIES[streaming](
        stream if handler.response_streaming else single,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


class _Guard(grpc.aio.ServerInterceptor):
    """Wraps the handlers of every guarded service in :meth:`around`."""

    async def intercept_service(self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _service(method) in UNGUARDED_SERVICES:
            return handler
        return wrap_handler(handler, method, self.around)

    @abstractmethod
    def around(self, context: Context, method: str) -> AbstractAsyncContextManager[None]:
        """Runs around the whole call; raising refuses it."""


class WriteTimeoutInterceptor(grpc.aio.ServerInterceptor):
    """Server streams whose responses are written here, each within ``timeout_s`` (``server.stream_write_timeout_s``).

    A write waits while HTTP/2 flow control is closed, that is while the client reads nothing. When one waits too
    long, the servicer's stream is closed (which cancels its engine request, recorded as ``cancelled``) and a
    CANCELLED status is queued behind the stuck message without waiting for it: the stream slot is free at once,
    and a client that reads again at last sees why its stream ended.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    async def intercept_service(self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not handler.response_streaming or _service(method) in UNGUARDED_SERVICES:
            return handler
        behavior: Any = handler.unary_stream or handler.stream_stream
        timeout = self._timeout_s

        async def written(request: Any, context: Context) -> None:
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    try:
                        async with asyncio.timeout(timeout):  # no task per write, unlike wait_for on 3.11
                            await context.write(response)
                    except TimeoutError:
                        break
                else:
                    return
            log.warning(
                "%s: the client %s read nothing for %.1f s (server.stream_write_timeout_s); stream cancelled",
                method,
                context.peer(),
                timeout,
            )
            message = f"the client read nothing for {timeout:g} s (server.stream_write_timeout_s); stream cancelled"
            with suppress(TimeoutError):  # the status waits behind the stuck message; the RPC ends without it
                async with asyncio.timeout(0.05):
                    await context.abort(grpc.StatusCode.CANCELLED, message)

        return _FACTORIES[(handler.request_streaming, True)](
            written,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ErrorInterceptor(_Guard):
    """Turns every exception a servicer raises into its status code and message (``errors.status_of``)."""

    @asynccontextmanager
    async def around(self, context: Context, method: str) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)


class AuthInterceptor(_Guard):
    """Authenticates the bearer token (when auth is on), checks admin methods and records the caller's tenant."""

    def __init__(self, tokens: TokenTable | None) -> None:
        self._tokens = tokens

    @asynccontextmanager
    async def around(self, context: Context, method: str) -> AsyncIterator[None]:
        tenant = OPEN_ACCESS if self._tokens is None else self._tokens.authenticate(context.invocation_metadata() or ())
        if method in ADMIN_METHODS:
            tenant.check_admin(method)
        set_current_tenant(tenant)
        yield
