"""The one place that maps errors to gRPC status codes, and the few errors the API layer raises itself.

Engine errors (``server/core/errors.py``), routing errors (``server/routing/errors.py``) and adapter upload
errors (``server/lora/upload.py``) keep their meaning; the API adds authentication and authorization failures.
Anything else is a bug: it becomes INTERNAL with a generic message and is logged in full.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import grpc

from loraplex.server.core.errors import (
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
from loraplex.server.lora.upload import (
    InvalidUpload,
    UploadConflict,
    UploadError,
    UploadStorageFailed,
    UploadStorageFull,
)
from loraplex.server.routing.errors import (
    FeedbackExists,
    InvalidFeedback,
    InvalidRoute,
    RoutesFileError,
    RoutingError,
    StaleFeedback,
    UnknownRequest,
    UnknownRoute,
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
ROUTING_CODES: dict[type[RoutingError], grpc.StatusCode] = {
    InvalidRoute: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownRoute: grpc.StatusCode.NOT_FOUND,
    UnknownRequest: grpc.StatusCode.NOT_FOUND,
    InvalidFeedback: grpc.StatusCode.INVALID_ARGUMENT,
    FeedbackExists: grpc.StatusCode.ALREADY_EXISTS,
    StaleFeedback: grpc.StatusCode.FAILED_PRECONDITION,
    RoutesFileError: grpc.StatusCode.FAILED_PRECONDITION,
}

UPLOAD_CODES: dict[type[UploadError], grpc.StatusCode] = {
    InvalidUpload: grpc.StatusCode.INVALID_ARGUMENT,
    UploadConflict: grpc.StatusCode.ABORTED,
    UploadStorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UploadStorageFailed: grpc.StatusCode.FAILED_PRECONDITION,
}


def code_of(error: Exception) -> grpc.StatusCode | None:
    """The status code of a known error type; None for anything unexpected (a bug)."""
    if isinstance(error, ApiError):
        return error.code
    for kind, code in (*ENGINE_CODES.items(), *ROUTING_CODES.items(), *UPLOAD_CODES.items()):
        if isinstance(error, kind):
            return code
    return None


# Messages often quote what the client sent (an id, a route name); the status travels in a trailer, and gRPC
# clients drop trailers over 8-16 KiB (non-ASCII is percent-encoded: up to 12 bytes a character) with
# RESOURCE_EXHAUSTED instead of the real code. So the message is cut to this many characters.
MAX_MESSAGE_CHARS = 512


def bounded(message: str) -> str:
    """``message``, cut to MAX_MESSAGE_CHARS with a mark when it is longer."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    mark = " … (message truncated)"
    return message[: MAX_MESSAGE_CHARS - len(mark)] + mark


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and client message for ``error``; unexpected errors are logged with their traceback."""
    code = code_of(error)
    if code is not None:
        return code, bounded(str(error))
    log.error("unexpected error in an RPC", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(error).__name__}); the server logged the details"
