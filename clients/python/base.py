"""What the blocking and the asyncio client share: connection options, default deadline and retry policy."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Unpack

from loraplex.client.channel import DEFAULT_TARGET, Connection
from loraplex.client.retry import DEFAULT_RETRY, Attempts, RetryPolicy
from loraplex.client.types import ConnectionOptions


class ClientBase(ABC):
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        """``target`` is host:port; ``timeout`` the default deadline of a call in seconds (None = none)."""
        self.connection = Connection(target, **connection)
        self.timeout = timeout
        self.retry = retry
        self._bind()

    @abstractmethod
    def _bind(self) -> None:
        """Opens the channel and creates the stubs."""

    def _attempts(self, timeout: float | None, retry: RetryPolicy | None = None) -> Attempts:
        return Attempts(retry or self.retry, self.timeout if timeout is None else timeout)
