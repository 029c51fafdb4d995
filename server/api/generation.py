"""The loraplex.v1 Generation servicer: Generate (unary), GenerateStream (server streaming) and Tokenize."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from loraplex.server.api import convert
from loraplex.server.api.auth import current_tenant
from loraplex.server.api.prompts import check_prompt_chars, prompt_chars
from loraplex.server.api.state import Context, ServingState
from loraplex.server.api.targets import Target, resolve
from loraplex.server.api.tracking import RequestTrack
from loraplex.server.core.errors import InternalError
from loraplex.server.core.types import Finished, GenerationRequest, TokenDelta


def deadline_of(context: Context) -> float | None:
    """The client's deadline as a ``time.monotonic()`` instant (None without one)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def request_id_of(given: str) -> str:
    return given or uuid.uuid4().hex


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, state: ServingState) -> None:
        self._state = state

    def _engine_request(
        self, request: generation_pb2.GenerateRequest, context: Context, record: RequestTrack
    ) -> tuple[GenerationRequest, Target]:
        tenant = current_tenant()
        target = resolve(tenant, self._state.router, request.adapter_id, request.route, request.user_key)
        record.resolved(target)
        engine_request = convert.generation_request(
            request,
            request_id=request_id_of(request.request_id),
            target=target,
            deadline=deadline_of(context),
            default_max_new_tokens=self._state.settings.server.default_max_new_tokens,
            tenant=tenant.name,
            tenant_weight=tenant.weight,
        )
        return engine_request, target

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> generation_pb2.GenerateResponse:
        async with self._state.track() as record:
            engine_request, target = self._engine_request(request, context, record)
            text: list[str] = []
            token_ids: list[int] = []
            logprobs: list[float] = []
            async with aclosing(self._state.generate(engine_request, record)) as events:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        text.append(event.text)
                        token_ids += event.token_ids
                        logprobs += event.logprobs or ()
                        continue
                    last = convert.summary(event, target, time.monotonic() - record.started)
                    request_id = engine_request.request_id
                    return convert.generate_response(request_id, "".join(text), token_ids, logprobs, last)
            raise InternalError("the generation ended without a result")

    async def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async with self._state.track() as record:
            engine_request, target = self._engine_request(request, context, record)
            request_id = engine_request.request_id
            async with aclosing(self._state.generate(engine_request, record)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        yield convert.last_stream_message(
                            request_id, convert.summary(event, target, time.monotonic() - record.started)
                        )
                    else:
                        yield convert.delta_message(request_id, event)

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: Context
    ) -> generation_pb2.TokenizeResponse:
        prompt, messages = convert.prompt_of(request.prompt, list(request.messages))
        check_prompt_chars(prompt_chars(prompt, messages), self._state.settings.server.max_prompt_chars)
        engine = self._state.engine()
        token_ids = await asyncio.to_thread(engine.tokenize, prompt, messages)
        return generation_pb2.TokenizeResponse(token_ids=token_ids, count=len(token_ids))
