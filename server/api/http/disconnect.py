"""Answering a request only while its client is still there.

A non-streaming generation sends nothing until it finishes, so nothing would notice a client that hung up in the
meantime: its sequence would run to its last token. :func:`unless_disconnected` runs the handler's work beside a
wait on the ASGI receive channel (whose next message, once the body is read, is ``http.disconnect``) and cancels the
work when the client goes first: the generation's iterators close, the engine frees its sequence at the next step,
and the request is counted ``cancelled``, exactly like a streaming client that hung up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from fastapi import Request, Response

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away (never seen by that client)


async def _hung_up(request: Request) -> None:
    """Returns once the client disconnected (call it after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """``work``'s response, or a 499 (sent to nobody) once ``work`` was cancelled because the client left first."""
    answer = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watch, answer):
            task.cancel()  # no-op for a task already done
        await asyncio.gather(watch, answer, return_exceptions=True)  # the work's clean-up has run on return
    if answer.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return answer.result()
