"""Shadow traffic: a copy of a routed request sent to the route's shadow adapter as a separate engine request.

The copy has its own request id, runs in its own task, and its output is read and thrown away; its metrics are
recorded under the variant label ``shadow:<adapter>``. It never touches the caller's stream: it takes no slot of
``server.max_concurrent_streams``, its failures are only counted, and it is shed (counted as ``shed``) when
``routing.shadow_max_inflight`` copies already run or the engine's queue is at ``routing.shadow_shed_queue_fraction``
of ``engine.max_queue``, so that real requests find room first.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from loraplex.server.api.tracking import track
from loraplex.server.config import Settings
from loraplex.server.core.types import GenerationEvent, GenerationRequest
from loraplex.server.observability.telemetry import RequestLabels, Telemetry
from loraplex.server.routing.router import Assignment, Router

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from loraplex.server.engine.engine import Engine

log = logging.getLogger(__name__)


class ShadowDispatcher:
    def __init__(self, settings: Settings, telemetry: Telemetry, router: Router) -> None:
        self._max_inflight = settings.routing.shadow_max_inflight
        self._shed_waiting = settings.routing.shadow_shed_queue_fraction * settings.engine.max_queue
        self._telemetry = telemetry
        self._router = router
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    def mirror(self, engine: Engine, request: GenerationRequest, assignment: Assignment | None) -> None:
        """Starts the shadow copy of ``request`` when its assignment says so, or counts it as shed. Never raises."""
        if assignment is None or assignment.shadow is None:
            return
        shadow = assignment.shadow
        labels = RequestLabels(shadow.adapter, assignment.route, shadow.label)
        if len(self._tasks) >= self._max_inflight or engine.stats().waiting >= self._shed_waiting:
            self._telemetry.request_failed(labels, "shed")
            return
        copy = replace(request, request_id=f"shadow-{uuid.uuid4().hex}", adapter_id=shadow.adapter_id)
        task = asyncio.create_task(self._run(engine, copy, labels), name=f"shadow {copy.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, engine: Engine, request: GenerationRequest, labels: RequestLabels) -> None:
        try:
            async with track(self._telemetry, self._router) as record:
                record.labels = labels
                events = cast("AsyncGenerator[GenerationEvent]", engine.generate(request))
                async with aclosing(events) as stream:
                    async for event in stream:
                        record.observe(request.request_id, event)
        except Exception as error:  # counted by track(); the caller never sees it
            log.debug("shadow request %s failed: %s", request.request_id, error)

    def cancel_all(self) -> None:
        """Cancels every running copy (on drain: shadows must not hold up shutdown)."""
        for task in list(self._tasks):
            task.cancel()
