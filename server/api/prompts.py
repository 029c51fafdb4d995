"""Prompt intake: refuse oversized prompt text before any tokenizer work, and tokenize long prompts on a worker
thread so the event loop keeps streaming other requests' tokens meanwhile.

Tokenizing is linear in the text (about 1 ms per 1,000 tokens on one CPU core); the engine does it inside
``submit``, on the caller's thread. Short prompts stay there; longer ones are tokenized here first (with the
engine's own tokenizer and chat template) and submitted as token ids.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING

from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.types import ChatMessage, GenerationRequest

if TYPE_CHECKING:
    from loraplex.server.engine.engine import Engine

OFFLOAD_CHARS = 4096  # prompts longer than this are tokenized on a worker thread


def prompt_chars(prompt: str | None, messages: tuple[ChatMessage, ...] | None) -> int:
    return len(prompt or "") + sum(len(m.content) for m in messages or ())


def check_prompt_chars(chars: int, limit: int) -> None:
    if chars > limit:
        raise InvalidRequest(
            f"the prompt has {chars} characters, more than server.max_prompt_chars={limit}; shorten it"
        )


async def pretokenize(engine: Engine, request: GenerationRequest, max_chars: int) -> GenerationRequest:
    """``request`` as it goes to the engine: unchanged when short, with token ids instead of text when long."""
    chars = prompt_chars(request.prompt, request.messages)
    check_prompt_chars(chars, max_chars)
    if chars <= OFFLOAD_CHARS:
        return request
    token_ids = await asyncio.to_thread(engine.tokenize, request.prompt, request.messages)
    limit = engine.settings.engine.max_prompt_tokens
    if len(token_ids) > limit:
        raise InvalidRequest(f"prompt has {len(token_ids)} tokens, more than the limit of {limit}")
    return replace(request, prompt=None, messages=None, prompt_token_ids=tuple(token_ids))
