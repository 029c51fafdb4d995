"""The loraplex Python client and CLI.

``Client`` (blocking) and ``AsyncClient`` (asyncio) call a loraplex server over gRPC and return typed results;
failures raise the exception of their status code (``loraplex.client.errors``)::

    from loraplex.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", adapter="support-v2", max_new_tokens=16).text)
"""

from loraplex.client.aio import AsyncClient
from loraplex.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalServerError,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from loraplex.client.retry import RetryPolicy
from loraplex.client.sync import Client
from loraplex.client.types import (
    Adapter,
    ChatMessage,
    Generation,
    ServedBy,
    ServerStatus,
    StreamChunk,
    Timings,
    Tokenization,
    Usage,
)

__all__ = [
    "Adapter",
    "AsyncClient",
    "ChatMessage",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Generation",
    "InternalServerError",
    "InvalidArgumentError",
    "LoraplexError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServedBy",
    "ServerStatus",
    "StreamChunk",
    "Timings",
    "Tokenization",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
