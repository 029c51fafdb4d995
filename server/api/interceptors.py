"""Server interceptors: errors → status codes (outermost), then authentication and admin checks.

Both wrap the servicer's behaviour in an async context manager that runs around the whole call, streaming or not.
Health and reflection are left alone: probes and ``grpcurl list`` need no token.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any, TypeAlias

import grpc

from loraplex.server.api.auth import OPEN_ACCESS, TokenTable, set_current_tenant
from loraplex.server.api.errors import status_of
from loraplex.server.api.state import Context

Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"

UNGUARDED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
ADMIN_METHODS = frozenset(
    {
        "/loraplex.v1.Adapters/LoadAdapter",
        "/loraplex.v1.Adapters/UnloadAdapter",
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


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    around: Callable[[Context, str], AbstractAsyncContextManager[None]],
) -> Any:
    """``handler`` with its behaviour run inside ``around(context, method)``."""
    streaming = (handler.request_streaming, handler.response_streaming)
    behavior: Any = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    async def single(request: Any, context: Context) -> Any:
        async with around(context, method):
            return await behavior(request, context)

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        async with around(context, method), aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response

    return _FACTORIES[streaming](
        stream if handler.response_streaming else single,
        request_deserializer=handler.request_deserializer,
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
