"""Retries with exponential backoff, for UNAVAILABLE only (the server is starting, draining or unreachable: the
request was not accepted, so sending it again is safe), within the call's deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from loraplex.client.errors import error_from, status_code


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # 1 = no retries
    initial_backoff: float = 0.2  # seconds before the first retry (jittered down to half)
    max_backoff: float = 3.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based): exponential, capped, with jitter."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return random.uniform(ceiling / 2, ceiling)


DEFAULT_RETRY = RetryPolicy()
NO_RETRIES = RetryPolicy(max_attempts=1)


class Attempts:
    """The attempts of one call: its deadline, and whether (and after how long) a failure is retried."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.count = 1

    def remaining(self) -> float | None:
        """The timeout of the next attempt: what is left of the call's deadline."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before retrying ``error``; raises its typed exception when it is not retried."""
        if status_code(error) is grpc.StatusCode.UNAVAILABLE and self.count < self._policy.max_attempts:
            delay = self._policy.backoff(self.count)
            if self._deadline is None or time.monotonic() + delay < self._deadline:
                self.count += 1
                return delay
        raise error_from(error) from None
