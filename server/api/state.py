"""The API's view of the server's life: starting → serving → draining, the health statuses that say so, and the
generation RPCs in flight (bounded by ``server.max_concurrent_streams``).

New calls get UNAVAILABLE while the base model loads and while the server drains; calls already running keep
their engine. Every generation runs inside :meth:`ServingState.track` (its metrics, drift and A/B record) and goes
through :meth:`ServingState.generate`, which holds a stream slot for as long as the caller iterates, mirrors the
request to its route's shadow when the assignment says so, and closes the engine's iterator (cancelling the
sequence) however the caller stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from loraplex.server.api.prompts import pretokenize
from loraplex.server.api.shadow import ShadowDispatcher
from loraplex.server.api.tracking import RequestTrack, track
from loraplex.server.config import Settings
from loraplex.server.core.errors import Overloaded, ShuttingDown
from loraplex.server.core.types import GenerationEvent, GenerationRequest
from loraplex.server.observability.telemetry import Telemetry
from loraplex.server.routing.router import Router

if TYPE_CHECKING:
    from loraplex.server.engine.engine import Engine

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"  # what every servicer method receives


class Phase(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


class ServingState:
    def __init__(
        self,
        settings: Settings,
        health: health_aio.HealthServicer,
        services: Sequence[str],
        router: Router,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.router = router
        self.telemetry = telemetry
        self.shadow = ShadowDispatcher(settings, telemetry, router)
        self.phase = Phase.STARTING
        self.active_streams = 0
        self._health = health
        self._services = ("", *services)  # "" is the server as a whole
        self._engine: Engine | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def mark_starting(self) -> None:
        for service in self._services:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serve(self, engine: Engine) -> None:
        self._engine = engine
        self.phase = Phase.SERVING
        for service in self._services:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Health goes NOT_SERVING for good, then new calls get UNAVAILABLE and the engine stops accepting (in this
        order: a balancer watching health stops sending before any call is refused)."""
        await self._health.enter_graceful_shutdown()
        self.phase = Phase.DRAINING
        self.shadow.cancel_all()
        if self._engine is not None:
            self._engine.begin_drain()

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no generation RPC is in flight; False if some still are after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    def engine(self) -> Engine:
        """The engine, for a new call; ShuttingDown (UNAVAILABLE) while starting or draining."""
        if self.phase is Phase.DRAINING:
            raise ShuttingDown("the server is draining for shutdown; retry on another replica")
        if self._engine is None:
            raise ShuttingDown("the server is starting (loading the base model); retry in a few seconds")
        return self._engine

    def track(self) -> AbstractAsyncContextManager[RequestTrack]:
        """The record of one generation (see :mod:`tracking`); open it first thing in a generation RPC."""
        return track(self.telemetry, self.router)

    async def generate(self, request: GenerationRequest, record: RequestTrack) -> AsyncGenerator[GenerationEvent]:
        """The engine's events for ``request``, holding one of ``server.max_concurrent_streams`` slots meanwhile.

        ``record`` (resolved to the request's target) sees every event; when its route assignment says so, the
        request is also mirrored to the route's shadow as an engine request of its own.
        """
        engine = self.engine()
        limit = self.settings.server.max_concurrent_streams
        if self.active_streams >= limit:
            raise Overloaded(
                f"{self.active_streams} generation requests are in flight (server.max_concurrent_streams={limit}); "
                "retry later"
            )
        self.active_streams += 1
        self._idle.clear()
        try:
            request = await pretokenize(engine, request, self.settings.server.max_prompt_chars)
            # The copy starts after this request is submitted: the first step of the iteration below.
            self.shadow.mirror(engine, request, record.target.assignment if record.target else None)
            # Engine.generate is an async generator (annotated as an iterator): closing it cancels the request.
            async with aclosing(cast(AsyncGenerator[GenerationEvent], engine.generate(request))) as events:
                async for event in events:
                    record.observe(request.request_id, event)
                    yield event
        finally:
            self.active_streams -= 1
            if self.active_streams == 0:
                self._idle.set()
