"""One request's state inside the engine, from submission to its last event.

Lifecycle: ``WAITING`` (queued; its adapter may still be loading) → ``RUNNING`` (holds a KV region and an adapter
reference; prefill chunks, then one token per step) → ``FINISHED``. Only the engine thread mutates a sequence,
except :meth:`cancel`, which any thread may call (the engine frees the sequence at its next step).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.server.engine.errors import EngineError
from loraplex.server.engine.kv_cache import Region
from loraplex.server.engine.sampler import SamplerState
from loraplex.server.engine.types import GenerationEvent, GenerationRequest, Timings
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
    region: Region | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    logprob_sum: float = 0.0
    prompt_hidden_sum: list[float] | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    cancel_reason: EngineError | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reserved_len(self) -> int:
        """KV positions reserved at admission: the prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.request.sampling.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

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
