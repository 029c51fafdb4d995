"""Shadow traffic through the API's serving state with a stand-in engine: the copy never reaches, delays or fails
the caller, takes no stream slot, is shed first when the engine queue fills, and is counted under its own label."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, cast

from grpc_health.v1.health import aio as health_aio

from loraplex.server.api.auth import OPEN_ACCESS
from loraplex.server.api.state import ServingState
from loraplex.server.api.targets import resolve
from loraplex.server.config import Settings, load_settings
from loraplex.server.core.errors import InternalError
from loraplex.server.core.types import (
    EngineStats,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    Timings,
    TokenDelta,
    Usage,
)
from loraplex.server.observability.telemetry import Telemetry
from loraplex.server.routing.experiments import Experiments
from loraplex.server.routing.router import Router
from loraplex.server.routing.routes import route_from_spec
from loraplex.server.routing.store import RouteStore

ROUTE = {
    "variants": [{"name": "main", "adapter": "live", "weight": 100}],
    "shadow": {"adapter": "candidate", "percent": 100},
}


class StandInEngine:
    """Answers each request with one token naming its adapter; can hold or fail an adapter's requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.requests: list[GenerationRequest] = []
        self.waiting = 0
        self.hold: dict[str | None, asyncio.Event] = {}
        self.failing: set[str | None] = set()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=0, waiting=self.waiting, kv_cache_usage=0.0, adapters_on_device=0, adapters_on_host=0
        )

    def begin_drain(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        if request.adapter_id in self.failing:
            raise InternalError("the candidate adapter blew up")
        if request.adapter_id in self.hold:
            await self.hold[request.adapter_id].wait()
        yield TokenDelta(text=f"<{request.adapter_id}>", token_ids=(7,))
        yield Finished(FinishReason.LENGTH, Usage(3, 1), Timings(0.0, 0.0, 0.0), request.adapter_id, 1, "")


async def make_state(**routing: Any) -> tuple[ServingState, StandInEngine]:
    settings = load_settings(
        environ={},
        overrides={"server": {"max_concurrent_streams": 1}, "engine": {"max_queue": 4}, "routing": routing},
    )
    router = Router(RouteStore(None, 10), Experiments(100, 100), random.Random(0))
    router.set_route(route_from_spec("r", ROUTE))
    state = ServingState(settings, health_aio.HealthServicer(), (), router, Telemetry(settings.observability))
    engine = StandInEngine(settings)
    await state.serve(cast(Any, engine))
    return state, engine


async def call(state: ServingState, request_id: str = "req") -> list[GenerationEvent]:
    async with state.track() as record:
        target = resolve(OPEN_ACCESS, state.router, "", "r", "user-1")
        record.resolved(target)
        request = GenerationRequest(request_id=request_id, prompt="hi", adapter_id=target.adapter_id)
        async with aclosing(state.generate(request, record)) as events:
            return [event async for event in events]


async def settle(state: ServingState) -> None:
    for _ in range(100):
        if state.shadow.inflight == 0:
            return
        await asyncio.sleep(0.01)


def shadow_count(state: ServingState, status: str) -> float:
    labels = {"adapter": "candidate", "route": "r", "variant": "shadow:candidate", "status": status}
    return state.telemetry.registry.get_sample_value("loraplex_requests_total", labels) or 0.0


def test_the_shadow_answer_never_reaches_the_caller() -> None:
    async def scenario() -> None:
        state, engine = await make_state()
        events = await call(state)
        await settle(state)
        assert [e.text for e in events if isinstance(e, TokenDelta)] == ["<live>"]
        assert isinstance(events[-1], Finished) and events[-1].adapter_id == "live"
        assert [(r.adapter_id, r.request_id.startswith("shadow-")) for r in engine.requests] == [
            ("live", False),
            ("candidate", True),
        ]
        assert engine.requests[1].prompt == "hi" and engine.requests[1].request_id != "req"
        assert shadow_count(state, "ok") == 1
        registry = state.telemetry.registry
        assert registry.get_sample_value("loraplex_route_assignments_total", {"route": "r", "variant": "main"}) == 1
        report = state.router.report("r")
        assert [(v.name, v.requests, v.completed) for v in report.variants] == [("main", 1, 1)]

    asyncio.run(scenario())


def test_a_failing_shadow_never_fails_the_caller() -> None:
    async def scenario() -> None:
        state, engine = await make_state()
        engine.failing.add("candidate")
        events = await call(state)
        await settle(state)
        assert isinstance(events[-1], Finished)
        assert shadow_count(state, "internal") == 1 and shadow_count(state, "ok") == 0

    asyncio.run(scenario())


def test_the_caller_never_waits_for_its_shadow_and_shadows_take_no_stream_slot() -> None:
    async def scenario() -> None:
        state, engine = await make_state()
        engine.hold["candidate"] = asyncio.Event()
        first = await asyncio.wait_for(call(state, "one"), timeout=5)
        assert isinstance(first[-1], Finished) and state.shadow.inflight == 1
        # server.max_concurrent_streams is 1 and a shadow is still running: the next caller is not refused.
        second = await asyncio.wait_for(call(state, "two"), timeout=5)
        assert isinstance(second[-1], Finished) and state.active_streams == 0
        engine.hold["candidate"].set()
        await settle(state)
        assert shadow_count(state, "ok") == 2

    asyncio.run(scenario())


def test_shadows_are_shed_first_when_the_queue_is_near_full_or_too_many_run() -> None:
    async def scenario() -> None:
        state, engine = await make_state(shadow_max_inflight=1)
        engine.waiting = 2  # routing.shadow_shed_queue_fraction 0.5 of engine.max_queue 4
        assert isinstance((await call(state, "busy"))[-1], Finished)
        assert shadow_count(state, "shed") == 1 and len(engine.requests) == 1
        engine.waiting = 0
        engine.hold["candidate"] = asyncio.Event()
        await call(state, "a")
        await call(state, "b")  # the first shadow still runs: routing.shadow_max_inflight=1
        assert shadow_count(state, "shed") == 2 and state.shadow.inflight == 1
        await asyncio.sleep(0.05)  # the held shadow starts running
        await state.drain()  # drain cancels running shadows
        await settle(state)
        assert shadow_count(state, "cancelled") == 1

    asyncio.run(scenario())
