"""One request's state inside the engine, from submission to its last event.

Lifecycle: ``WAITING`` (queued; its adapter may still be loading) → ``RUNNING`` (holds KV blocks, its block table
growing with its tokens, and an adapter reference; prefill chunks, then one token per step) → ``FINISHED``. When
the KV cache runs out, the scheduler *preempts* the newest running sequences: back to ``WAITING`` at the front of
the queue, blocks freed and ``num_computed`` reset to 0, but keeping its output so far and its adapter reference;
on resumption it recomputes prompt + output (a prefill) and continues, emitting no token twice. With the prefix
cache on, a sequence that starts (or resumes) begins with the cached blocks of its longest cached prompt prefix
(shared with other sequences, ``num_computed`` past them) and publishes its own full prompt blocks as they fill.
Only the engine thread mutates a sequence, except :meth:`cancel`, which any thread may call (the engine frees the
sequence at its next step).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from loraplex.server.core.errors import EngineError
from loraplex.server.core.types import GenerationEvent, GenerationRequest, Timings
from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.server.engine.sampler import SamplerState
from loraplex.server.lora.cache import AdapterVersion


class EventSink(Protocol):
    """Where a sequence's events go. Called on the engine thread; must not block."""

    def push(self, event: GenerationEvent) -> bool:
        """Delivers an event; False when the reader is gone or too far behind (the engine cancels)."""

    def fail(self, error: EngineError) -> None:
        """Ends the stream with an error."""


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    sink: EventSink
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    eos_ids: frozenset[int]
    adapter_future: Future[AdapterVersion] | None  # None: base model, or the adapter's lookup not started yet
    submitted_at: float  # time.monotonic() when submit() was called
    status: Status = Status.WAITING
    adapter: AdapterVersion | None = None
    blocks: list[int] = field(default_factory=list)  # block table: the KV blocks holding its positions, in order
    adapter_acquired: bool = False  # holds a reference on ``adapter`` (from admission until it leaves)
    preemptions: int = 0  # times its KV blocks were taken back
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    logprob_sum: float = 0.0
    prefix_keys: list[bytes] | None = None  # prefix-cache keys of its full prompt blocks (server/engine/prefix.py)
    num_published: int = 0  # leading blocks of its table that are published in the prefix cache (or were tried)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    cancel_reason: EngineError | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``start .. stop - 1`` of prompt + output, without concatenating the two."""
        prompt = len(self.prompt_ids)
        if stop <= prompt:
            return self.prompt_ids[start:stop]
        if start >= prompt:
            return self.output_ids[start - prompt : stop - prompt]
        return self.prompt_ids[start:] + self.output_ids[: stop - prompt]

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens not in the cache yet: the prompt (or, after a preemption, prompt + output) or the last token."""
        return self.total_len - self.num_computed

    @property
    def prefilling(self) -> bool:
        """More than one token to compute: a prompt, or a preempted sequence's recomputation."""
        return self.pending > 1

    def cancel(self, reason: EngineError) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def timings(self, now: float) -> Timings:
        scheduled = self.scheduled_at if self.scheduled_at is not None else now
        first = self.first_token_at if self.first_token_at is not None else now
        return Timings(
            queue_wait=scheduled - self.submitted_at,
            time_to_first_token=first - self.submitted_at,
            total=now - self.submitted_at,
        )
