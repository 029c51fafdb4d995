"""Value types of the engine's public API: requests, sampling parameters, streamed events, adapter info.

These are plain frozen dataclasses: the API layer converts protobuf to and from them, the engine never sees
protobuf, and tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ConstraintKind(StrEnum):
    JSON_SCHEMA = "json_schema"  # text: a JSON schema
    JSON_OBJECT = "json_object"  # any JSON object; text unused
    REGEX = "regex"  # text: a regular expression the whole output matches
    GRAMMAR = "grammar"  # text: a Lark or GBNF grammar


@dataclass(frozen=True)
class Constraint:
    """Structured output: every generated token keeps the output a prefix of a string the spec accepts."""

    kind: ConstraintKind
    text: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False
    constraint: Constraint | None = None  # structured output (server/engine/constraints.py)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of ``prompt``, ``messages`` or ``prompt_token_ids`` is set.

    ``adapter_id`` None (or "") means the base model. ``deadline`` is a ``time.monotonic()`` instant. ``tenant``
    (the caller's, set by the API layer from its auth token) and ``cache_salt`` (the request's own) name its prefix
    cache namespace: blocks are reused only between requests of the same namespace (server/engine/prefix.py).
    """

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    adapter_id: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None
    tenant: str | None = None
    tenant_weight: float = 1.0  # the tenant's share weight (tokens file ``weight``; server/engine/fairness.py)
    cache_salt: str | None = None


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds, measured inside the engine from submission."""

    queue_wait: float  # submitted → first scheduled (includes waiting for the adapter to load)
    time_to_first_token: float  # submitted → first token sampled
    total: float  # submitted → finished


@dataclass(frozen=True)
class TokenDelta:
    """New output: ``text`` may be empty while bytes of a multi-byte character or a possible stop string wait."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of a successful generation."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    adapter_id: str | None
    adapter_version: int
    text: str  # the whole completion (stop string removed)
    mean_logprob: float | None = None  # mean token log-probability of the completion
    prompt_embedding: tuple[float, ...] | None = None  # mean-pooled final hidden state over the prompt


GenerationEvent = TokenDelta | Finished


class ResidencyTier(StrEnum):
    DEVICE = "device"  # in a device slot, ready for the next batch
    HOST = "host"  # weights in host memory, one copy away from a slot
    DISK = "disk"  # known, not in memory
    LOADING = "loading"


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    version: int
    content_hash: str
    rank: int
    target_modules: tuple[str, ...]
    use_dora: bool
    size_bytes: int
    tier: ResidencyTier
    pinned: bool
    loaded_at: float  # wall-clock seconds since the epoch
    requests_served: int
    source_dir: str
    files_signature: tuple[int, ...]  # of source_dir's files when this version was read (lora.sources)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    adapters_on_device: int
    adapters_on_host: int
    running_adapters: tuple[str, ...] = ()  # sorted ids of adapters with a running request
    waiting_adapters: tuple[str, ...] = ()  # sorted ids of adapters with a waiting request (vLLM: may also be running)
    device_slots: int = 0  # adapters.device_slots: adapters the device holds at once
    prefix_cache_blocks: int = 0  # KV blocks published in the prefix cache (referenced or idle)
