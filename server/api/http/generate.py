"""One HTTP generation through :class:`ServingState`: the model name resolved exactly as the Open Inference
Protocol resolves it (a route, ``base`` or an adapter id; the base model's own name means ``base``), tracked like
every gRPC generation (metrics, drift, A/B statistics), and started before any byte of the response is sent, so a
refusal (unknown adapter, full queue, draining) is an HTTP status rather than a broken stream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING

from loraplex.server.api.auth import Tenant
from loraplex.server.api.http.convert import Head, Spec
from loraplex.server.api.state import ServingState
from loraplex.server.api.targets import resolve_model
from loraplex.server.core.errors import InternalError
from loraplex.server.core.types import GenerationEvent, GenerationRequest
from loraplex.server.routing.routes import BASE_MODEL

if TYPE_CHECKING:
    from loraplex.server.engine.engine import Engine

_ID_PREFIX = {"completion": "cmpl-", "chat": "chatcmpl-"}


class Started:
    """A generation the engine accepted: its :class:`Head`, first event and the rest, in :meth:`events`."""

    def __init__(
        self, head: Head, first: GenerationEvent, rest: AsyncGenerator[Head | GenerationEvent], engine: Engine
    ) -> None:
        self.head = head
        self._first = first
        self._rest = rest
        self._engine = engine

    async def events(self) -> AsyncGenerator[GenerationEvent]:
        """Every event, first to last; closing this iterator (or leaving it early) cancels the generation."""
        async with aclosing(self._rest) as rest:
            yield self._first
            async for event in rest:
                assert not isinstance(event, Head)
                yield event

    async def aclose(self) -> None:
        await self._rest.aclose()

    def token_texts(self, token_ids: tuple[int, ...]) -> list[str]:
        """Each token's own text (for log-probabilities)."""
        return [self._engine.tokenizer.decode([token_id]) for token_id in token_ids]


async def _run(state: ServingState, tenant: Tenant, spec: Spec) -> AsyncGenerator[Head | GenerationEvent]:
    """Yields the :class:`Head` once the target is resolved, then the engine's events."""
    async with state.track() as record:
        engine = state.engine()
        model = BASE_MODEL if spec.model == engine.base.name else spec.model
        target = resolve_model(tenant, state.router, model, spec.user_key)
        record.resolved(target)
        request_id = uuid.uuid4().hex
        request = GenerationRequest(
            request_id=request_id,
            prompt=spec.prompt,
            messages=spec.messages,
            prompt_token_ids=spec.prompt_token_ids,
            adapter_id=target.adapter_id,
            sampling=spec.sampling,
            tenant=tenant.name,
            tenant_weight=tenant.weight,
            cache_salt=spec.cache_salt,
        )
        yield Head(spec.kind, _ID_PREFIX[spec.kind] + request_id, int(time.time()), request_id, target)
        async with aclosing(state.generate(request, record)) as events:
            async for event in events:
                yield event


async def start(state: ServingState, tenant: Tenant, spec: Spec) -> Started:
    """Resolves, submits and waits for the first event of ``spec``; raises the request's error instead."""
    run = _run(state, tenant, spec)
    try:
        head = await anext(run)
        first = await anext(run)
    except StopAsyncIteration:
        raise InternalError("the generation ended without a result") from None
    except BaseException:
        await run.aclose()
        raise
    assert isinstance(head, Head) and not isinstance(first, Head)
    return Started(head, first, run, state.engine())
