"""Typed client exceptions, one per gRPC status code the server uses; each keeps the code and the server's message."""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A failed call: ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(LoraplexError):
    """Bad parameters, an empty or too long prompt: fix the request."""


class NotFoundError(LoraplexError):
    """Unknown adapter, route or model."""


class AlreadyExistsError(LoraplexError):
    """Feedback for this request was already recorded."""


class FailedPreconditionError(LoraplexError):
    """The adapter exists but cannot be served, or a route changed since the request; the message says why."""


class ResourceExhaustedError(LoraplexError):
    """The server's queue or stream limit is full; retry later."""


class DeadlineExceededError(LoraplexError):
    """The call's deadline passed; the server freed the request."""


class UnavailableError(LoraplexError):
    """The server is starting, draining or unreachable (retried with backoff before this is raised)."""


class UnauthenticatedError(LoraplexError):
    """No bearer token, or one the server does not know."""


class PermissionDeniedError(LoraplexError):
    """The token may not use this adapter or route, or may not call admin RPCs."""


class RequestCancelledError(LoraplexError):
    """The call was cancelled."""


class InternalServerError(LoraplexError):
    """A bug on the server; its log has the details."""


_BY_CODE: dict[grpc.StatusCode, type[LoraplexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.INTERNAL: InternalServerError,
}


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = error.code()
    return code


def error_from(error: grpc.RpcError) -> LoraplexError:
    """The typed exception for a failed gRPC call."""
    code = status_code(error)
    details: str | None = error.details()
    return _BY_CODE.get(code, LoraplexError)(code, details or code.name)
