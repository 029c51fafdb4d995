"""One mapping from errors to status codes: every engine error and API error has its code and keeps its message."""

from __future__ import annotations

import grpc
import pytest

from loraplex.server.api.errors import MAX_MESSAGE_CHARS, PermissionDenied, Unauthenticated, status_of
from loraplex.server.core import errors as engine
from loraplex.server.routing import errors as routing

CASES = [
    (engine.InvalidRequest("bad top_p"), grpc.StatusCode.INVALID_ARGUMENT),
    (engine.AdapterNotFound("no such adapter"), grpc.StatusCode.NOT_FOUND),
    (engine.AdapterRejected("rank too large"), grpc.StatusCode.FAILED_PRECONDITION),
    (engine.Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (engine.DeadlineExceeded("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (engine.Cancelled("gone"), grpc.StatusCode.CANCELLED),
    (engine.ShuttingDown("draining"), grpc.StatusCode.UNAVAILABLE),
    (engine.InternalError("step failed"), grpc.StatusCode.INTERNAL),
    (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
    (routing.InvalidRoute("weights must sum to 100"), grpc.StatusCode.INVALID_ARGUMENT),
    (routing.UnknownRoute("unknown route 'x'"), grpc.StatusCode.NOT_FOUND),
    (routing.UnknownRequest("no routed request 'r'"), grpc.StatusCode.NOT_FOUND),
    (routing.InvalidFeedback("no label"), grpc.StatusCode.INVALID_ARGUMENT),
    (routing.FeedbackExists("already recorded"), grpc.StatusCode.ALREADY_EXISTS),
    (routing.StaleFeedback("route changed"), grpc.StatusCode.FAILED_PRECONDITION),
    (routing.RoutesFileError("disk full"), grpc.StatusCode.FAILED_PRECONDITION),
]


@pytest.mark.parametrize(("error", "code"), CASES, ids=lambda v: type(v).__name__)
def test_each_error_has_its_code_and_message(error: Exception, code: grpc.StatusCode) -> None:
    assert status_of(error) == (code, str(error))


def test_every_engine_and_routing_error_is_mapped() -> None:
    mapped = {type(error) for error, _ in CASES}
    assert set(engine.EngineError.__subclasses__()) <= mapped
    assert set(routing.RoutingError.__subclasses__()) <= mapped


def test_unexpected_errors_are_internal_without_their_text(caplog: pytest.LogCaptureFixture) -> None:
    code, message = status_of(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "KeyError" in message
    assert "unexpected error" in caplog.text


def test_messages_quoting_huge_client_input_are_cut_to_fit_a_trailer() -> None:
    name = "🦙" * 100_000  # percent-encoded, the whole name would be 1.2 MB of trailer: clients drop it
    code, message = status_of(routing.InvalidRoute(f"route name {name!r} is not valid"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) == MAX_MESSAGE_CHARS and message.startswith("route name '🦙")
    assert message.endswith(" … (message truncated)")
    assert status_of(routing.InvalidRoute("x" * MAX_MESSAGE_CHARS))[1] == "x" * MAX_MESSAGE_CHARS
