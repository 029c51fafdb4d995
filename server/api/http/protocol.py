"""uvicorn's h11 protocol with a write timeout, so a client that stops reading cannot hold a connection, its
stream slot and (through its backlog) an engine slot for ever.

asyncio pauses a transport's writes once more than ``WRITE_BUFFER_HIGH`` bytes wait beyond what the kernel's socket
buffers hold, and resumes them once the client has read enough; uvicorn's ``send`` then waits for that resumption.
A connection whose writes stay paused for ``server.stream_write_timeout_s`` is aborted: uvicorn sees the client as
disconnected, the response stops (an SSE stream is cancelled like one whose client hung up: the engine frees its
sequence at the next step), and the log says why.

It also mends one case of uvicorn's: a request whose bytes turn invalid after its head (a broken chunked body)
gets uvicorn's own 400 and a closed connection, while the handler already started for it still runs; a handler that
answers without reading the body (a 401, say) then wrote a second response on the closed connection, which h11
refuses (an error logged with its traceback). Here that handler sees its client as gone, as after a hang-up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# Bytes buffered in the process beyond the kernel's before writes pause (asyncio's default is 64 KiB; a smaller
# buffer makes a stalled reader visible sooner and bounds the memory each one holds).
WRITE_BUFFER_HIGH = 8 * 1024


class WriteTimeoutProtocol(H11Protocol):
    """An :class:`H11Protocol` whose connection is aborted after ``write_timeout_s`` of paused writes."""

    write_timeout_s = 30.0  # set per server by :func:`with_write_timeout`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stalled: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.write_timeout_s, self._abort_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stall()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the handler's answer (if any) is dropped; its receive() says disconnect
            cycle.message_event.set()
            if cycle.response_started:  # h11 cannot start a second response: just close
                self.transport.close()
                return
        super().send_400_response(msg)

    def _cancel_stall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _abort_stalled(self) -> None:
        self._stalled = None
        log.warning(
            "HTTP client %s read nothing for %.1f s (server.stream_write_timeout_s); dropping its connection",
            f"{self.client[0]}:{self.client[1]}" if self.client else "?",
            self.write_timeout_s,
        )
        self.transport.abort()


def with_write_timeout(seconds: float) -> type[WriteTimeoutProtocol]:
    """The protocol class for one server (uvicorn takes a class, not an instance)."""
    return type("WriteTimeoutProtocol", (WriteTimeoutProtocol,), {"write_timeout_s": seconds})
