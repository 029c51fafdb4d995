"""The answer to a started generation: one JSON body, or Server-Sent Events (``data: {chunk}`` lines, then
``data: [DONE]``; with ``stream_options.include_usage`` a last chunk carries the usage and no choices).

An error after the first byte cannot change the status any more: it is sent as a ``data: {"error": …}`` chunk
(OpenAI's error JSON), then ``[DONE]``. A client that disconnects cancels the generation at the engine's next step.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.server.api.http import convert
from loraplex.server.api.http.convert import Spec
from loraplex.server.api.http.errors import reply_of
from loraplex.server.api.http.generate import Started
from loraplex.server.core.errors import InternalError
from loraplex.server.core.types import TokenDelta

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def whole(started: Started, spec: Spec) -> dict[str, Any]:
    """The non-streaming body, once the generation finished."""
    text: list[str] = []
    tokens: list[str] = []
    logprobs: list[float] = []
    async with aclosing(started.events()) as events:
        async for item in events:
            if isinstance(item, TokenDelta):
                text.append(item.text)
                if spec.sampling.logprobs:
                    tokens += started.token_texts(item.token_ids)
                    logprobs += item.logprobs or ()
                continue
            scores = convert.logprobs_json(spec.kind, tokens, logprobs) if spec.sampling.logprobs else None
            return convert.body(started.head, "".join(text), scores, item)
    raise InternalError("the generation ended without a result")


async def chunks(started: Started, spec: Spec) -> AsyncIterator[bytes]:
    head, usage = started.head, spec.include_usage
    offset = 0
    try:
        async with aclosing(started.events()) as events:
            if spec.kind == "chat":
                yield event(convert.chunk(head, None, None, usage, first=True))
            async for item in events:
                if not isinstance(item, TokenDelta):
                    yield event(convert.last_chunk(head, item, usage))
                    if usage:
                        yield event(convert.usage_chunk(head, item))
                    break
                if not item.text and not (spec.sampling.logprobs and item.token_ids):
                    continue  # held-back bytes: nothing to show yet
                scores = None
                if spec.sampling.logprobs:
                    texts = started.token_texts(item.token_ids)
                    scores = convert.logprobs_json(spec.kind, texts, list(item.logprobs or ()), offset)
                    offset += sum(len(t) for t in texts)
                yield event(convert.chunk(head, item, scores, usage, first=False))
    except Exception as error:  # the status line is gone: the error travels as a chunk
        yield event(reply_of(error).body)
    yield DONE


async def respond(started: Started, spec: Spec) -> JSONResponse | StreamingResponse:
    if spec.stream:
        return StreamingResponse(chunks(started, spec), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        return JSONResponse(await whole(started, spec))
    finally:
        await started.aclose()
