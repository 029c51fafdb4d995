"""The one place that maps errors to gRPC status codes, and the few errors the API layer raises itself.

Engine errors (``server/engine/errors.py``) keep their meaning; the API adds authentication, authorization and
routing failures. Anything else is a bug: it becomes INTERNAL with a generic message and is logged in full.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import grpc

from loraplex.server.engine.errors import (
    AdapterNotFound,
    AdapterRejected,
    Cancelled,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error of the API layer itself; ``str(error)`` is the message for the client."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN


class Unauthenticated(ApiError):
    """No bearer token, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ApiError):
    """The token's tenant may not use this adapter or route, or may not call admin RPCs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RouteNotFound(ApiError):
    """No A/B route with this name is configured."""

    code = grpc.StatusCode.NOT_FOUND


ENGINE_CODES: dict[type[EngineError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    AdapterRejected: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    InternalError: grpc.StatusCode.INTERNAL,
}


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and client message for ``error``; unexpected errors are logged with their traceback."""
    if isinstance(error, ApiError):
        return error.code, str(error)
    for kind, code in ENGINE_CODES.items():
        if isinstance(error, kind):
            return code, str(error)
    log.error("unexpected error in an RPC", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(error).__name__}); the server logged the details"
