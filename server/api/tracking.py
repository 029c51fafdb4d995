"""The record of one generation, from the RPC's start to its outcome, feeding metrics, drift and A/B statistics.

Every generation, loraplex.v1 or Open Inference Protocol, caller's or mirrored, runs inside :func:`track`: it
learns its labels once the target is resolved, sees each engine event, and on leaving records exactly one outcome:
``ok`` after the engine's ``Finished`` event, the status code of the error that ended it (lower case), or
``cancelled`` when the caller went away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from loraplex.server.api.errors import code_of
from loraplex.server.api.targets import Target
from loraplex.server.core.types import GenerationEvent, TokenDelta
from loraplex.server.observability.telemetry import RequestLabels, RequestTiming, Telemetry
from loraplex.server.routing.router import Router
from loraplex.server.routing.routes import BASE_MODEL


class RequestTrack:
    def __init__(self, telemetry: Telemetry, router: Router) -> None:
        self._telemetry = telemetry
        self._router = router
        self.started = time.monotonic()
        self.labels = RequestLabels("")
        self.first_token: float | None = None
        self.done = False
        self.target: Target | None = None

    def resolved(self, target: Target) -> None:
        """The request's target is known: label it, and count a route assignment."""
        self.target = target
        self.labels = RequestLabels(target.adapter_id or BASE_MODEL, target.route, target.variant)
        if target.assignment is not None:
            self._telemetry.route_assigned(target.route, target.variant)

    def observe(self, request_id: str, event: GenerationEvent) -> None:
        now = time.monotonic()
        if isinstance(event, TokenDelta):
            if event.token_ids and self.first_token is None:
                self.first_token = now
            return
        self.done = True
        self._telemetry.request_succeeded(self.labels, RequestTiming(self.started, self.first_token, now), event)
        if self.target is not None and self.target.assignment is not None:
            self._router.completed(self.target.assignment, request_id, now - self.started)

    def failed(self, status: str) -> None:
        self.done = True
        self._telemetry.request_failed(self.labels, status)


def status_name(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    code = code_of(error) if isinstance(error, Exception) else None
    return (code or grpc.StatusCode.INTERNAL).name.lower()


@asynccontextmanager
async def track(telemetry: Telemetry, router: Router) -> AsyncIterator[RequestTrack]:
    """A :class:`RequestTrack` whose outcome is recorded however the block ends."""
    record = RequestTrack(telemetry, router)
    try:
        yield record
    except BaseException as error:
        if not record.done:
            record.failed(status_name(error))
        raise
    if not record.done:  # the caller stopped reading before the last event
        record.failed("cancelled")
