"""The loraplex Python client and CLI.

``Client`` (blocking) and ``AsyncClient`` (asyncio) call a loraplex server over gRPC and return typed results;
failures raise the exception of their status code (``loraplex.client.errors``)::

    from loraplex.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", adapter="support-v2", max_new_tokens=16).text)
"""

from loraplex.client.aio import AsyncClient
from loraplex.client.errors import (
    AlreadyExistsError,
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
    AdapterList,
    ChatInput,
    ChatMessage,
    FeedbackResult,
    Generation,
    Route,
    RouteReport,
    ServedBy,
    ServerStatus,
    Shadow,
    StreamChunk,
    Timings,
    Tokenization,
    Usage,
    Variant,
    VariantReport,
)

__all__ = [
    "Adapter",
    "AdapterList",
    "AlreadyExistsError",
    "AsyncClient",
    "ChatInput",
    "ChatMessage",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FeedbackResult",
    "Generation",
    "InternalServerError",
    "InvalidArgumentError",
    "LoraplexError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Route",
    "RouteReport",
    "ServedBy",
    "ServerStatus",
    "Shadow",
    "StreamChunk",
    "Timings",
    "Tokenization",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "Variant",
    "VariantReport",
]
