"""Typed engine errors. The API layer maps each to one gRPC status code in one place; nothing here knows gRPC."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports to a caller. ``str(error)`` is the message for the client."""


class InvalidRequest(EngineError):
    """A parameter is out of range, the prompt is empty or too long, or the request is malformed."""


class AdapterNotFound(EngineError):
    """No adapter with this id exists under the adapter roots, or it was unloaded."""


class AdapterRejected(EngineError):
    """The adapter exists but cannot be served (bad files, foreign base, rank too large); the message says why."""


class Overloaded(EngineError):
    """The request queue is full; retry later or elsewhere."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it finished; its sequence was freed."""


class Cancelled(EngineError):
    """The caller cancelled the request (or stopped reading); its sequence was freed."""


class ShuttingDown(EngineError):
    """The engine is draining or stopped and accepts no new requests."""


class InternalError(EngineError):
    """An unexpected failure inside the engine; the request was failed, the engine keeps serving."""
