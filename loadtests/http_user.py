"""The OpenAI-compatible HTTP API for Locust users: a streaming chat completion read as Server-Sent Events.

Locust's gevent monkey-patching makes httpx's blocking sockets yield to other users' greenlets, as the gRPC user's
``init_gevent`` does for gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

DONE = "[DONE]"


def chat_body(adapter: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    """A streaming chat completion on ``adapter`` whose last chunk carries the usage."""
    return {
        "model": adapter,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_chunks(client: httpx.Client, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each ``data:`` chunk of ``POST /v1/chat/completions`` until ``[DONE]``; an HTTP error status or an error
    chunk raises."""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == DONE:
                return
            chunk: dict[str, Any] = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
            yield chunk
