"""OpenAI's error JSON for every failure of the HTTP API, from the same typed errors the gRPC layer maps.

An error's gRPC status code comes from :func:`loraplex.server.api.errors.status_of` (the one table of typed errors);
:data:`HTTP_STATUS` then maps each code to an HTTP status and OpenAI error type, so the two APIs never disagree.
The few failures only HTTP has (a body over the size limit, a route that does not exist) are :class:`HttpError`\\ s
that carry their own status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from fastapi.responses import JSONResponse

from loraplex.server.api.errors import bounded, status_of
from loraplex.server.core.errors import InvalidRequest


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error "type"
    retry_after_s: int | None = None  # sent as Retry-After


HTTP_STATUS: dict[grpc.StatusCode, HttpStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: HttpStatus(401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: HttpStatus(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: HttpStatus(404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: HttpStatus(409, "conflict_error"),
    grpc.StatusCode.ABORTED: HttpStatus(409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpStatus(429, "rate_limit_error", retry_after_s=1),
    grpc.StatusCode.CANCELLED: HttpStatus(499, "cancelled_error"),
    grpc.StatusCode.INTERNAL: HttpStatus(500, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: HttpStatus(501, "invalid_request_error"),
    grpc.StatusCode.UNAVAILABLE: HttpStatus(503, "service_unavailable_error", retry_after_s=5),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpStatus(504, "timeout_error"),
}
_FALLBACK = HttpStatus(500, "server_error")


class InvalidField(InvalidRequest):
    """A request field is missing, of the wrong type or not supported; ``param`` names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class HttpError(Exception):
    """A failure only the HTTP API has, with its own status (and no gRPC code)."""

    def __init__(self, status: HttpStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def body_too_large(limit: int) -> HttpError:
    return HttpError(
        HttpStatus(413, "invalid_request_error"),
        "request_too_large",
        f"the request body is larger than server.max_message_bytes={limit} bytes; send a smaller request",
    )


def no_such_path(method: str, path: str, status: int) -> HttpError:
    kind = HttpStatus(status, "not_found_error" if status == 404 else "invalid_request_error")
    return HttpError(kind, "not_found" if status == 404 else "method_not_allowed", f"no route {method} {path}")


@dataclass(frozen=True)
class ErrorReply:
    status: HttpStatus
    body: dict[str, Any]  # {"error": {"message", "type", "param", "code"}}


def reply_of(error: Exception) -> ErrorReply:
    """The status and OpenAI error body of ``error``; unexpected errors are logged (by ``status_of``) and 500."""
    if isinstance(error, HttpError):
        status, code, message = error.status, error.code, bounded(str(error))
    else:
        grpc_code, message = status_of(error)
        status, code = HTTP_STATUS.get(grpc_code, _FALLBACK), grpc_code.name.lower()
    param = error.param if isinstance(error, InvalidField) else None
    return ErrorReply(status, {"error": {"message": message, "type": status.type, "param": param, "code": code}})


def error_response(error: Exception) -> JSONResponse:
    reply = reply_of(error)
    retry = reply.status.retry_after_s
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse(reply.body, status_code=reply.status.status, headers=headers)
