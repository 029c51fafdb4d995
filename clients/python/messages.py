"""Requests built from plain Python values, and protobuf responses turned into the client's typed results.

Chat turns are checked here, before any request is built: a caller's mistake (a missing key, a number for text)
raises a TypeError or ValueError that names the turn and what to fix, not an error from deep inside protobuf.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any

from grpc_health.v1 import health_pb2

from loraplex.client.types import (
    SAMPLING_KEYS,
    Adapter,
    AdapterList,
    ChatInput,
    ChatMessage,
    GenerateOptions,
    Generation,
    ServedBy,
    ServerStatus,
    StreamChunk,
    Timings,
    Tokenization,
    Usage,
)
from loraplex.proto.v1 import adapters_pb2, generation_pb2, server_pb2

_CHAT_KEYS = frozenset({"role", "content"})
_CHAT_SHAPE = "a ChatMessage or a {'role': str, 'content': str} dict"


def _keys(keys: Iterable[object]) -> str:
    return ", ".join(sorted(repr(key) for key in keys))


def chat_message(turn: object, where: str = "chat message") -> ChatMessage:
    """``turn`` as a ChatMessage: a ChatMessage, or a mapping with exactly the keys 'role' and 'content' (both
    str); anything else raises TypeError (wrong types) or ValueError (missing or unknown keys) naming ``where``."""
    if isinstance(turn, Mapping):
        if missing := _CHAT_KEYS - turn.keys():
            raise ValueError(f"{where}: no {_keys(missing)}; each chat message needs 'role' and 'content'")
        if unknown := turn.keys() - _CHAT_KEYS:
            raise ValueError(f"{where}: unknown keys {_keys(unknown)}; a chat message has only 'role' and 'content'")
        role, content = turn["role"], turn["content"]
    elif isinstance(turn, ChatMessage):
        role, content = turn.role, turn.content
    else:
        raise TypeError(f"{where}: a {type(turn).__name__}; pass {_CHAT_SHAPE}")
    for name, value in (("role", role), ("content", content)):
        if not isinstance(value, str):
            raise TypeError(f"{where}: '{name}' is {type(value).__name__}, not str")
    return ChatMessage(role, content)


def chat_messages(chat: object) -> tuple[ChatMessage, ...]:
    """The chat turns of a chat call (None: none) as ChatMessages; see :func:`chat_message` for what each may be."""
    if chat is None:
        return ()
    if isinstance(chat, Mapping | ChatMessage):
        raise TypeError("chat: a single message; pass a list of them: [{'role': 'user', 'content': '...'}]")
    if isinstance(chat, str | bytes) or not isinstance(chat, Iterable):
        raise TypeError(f"chat: a {type(chat).__name__}; pass a list of messages, each {_CHAT_SHAPE}")
    return tuple(chat_message(turn, f"chat[{index}]") for index, turn in enumerate(chat))


def _chat(chat: Sequence[ChatInput] | None) -> list[generation_pb2.ChatMessage]:
    return [generation_pb2.ChatMessage(role=m.role, content=m.content) for m in chat_messages(chat)]


_CONSTRAINTS = {
    "json_schema": generation_pb2.CONSTRAINT_KIND_JSON_SCHEMA,
    "regex": generation_pb2.CONSTRAINT_KIND_REGEX,
    "grammar": generation_pb2.CONSTRAINT_KIND_GRAMMAR,
}


def _constraint(options: GenerateOptions) -> generation_pb2.Constraint | None:
    given = [(key, kind) for key, kind in _CONSTRAINTS.items() if key in options]
    if not given:
        return None
    if len(given) > 1:
        raise TypeError(f"pass at most one of {', '.join(_CONSTRAINTS)} (got {', '.join(k for k, _ in given)})")
    key, kind = given[0]
    value = options[key]  # type: ignore[literal-required]
    return generation_pb2.Constraint(kind=kind, text=value if isinstance(value, str) else json.dumps(value))


def generate_request(
    prompt: str | None, messages: Sequence[ChatInput] | None, options: GenerateOptions
) -> generation_pb2.GenerateRequest:
    sampling: dict[str, Any] = {key: value for key, value in options.items() if key in SAMPLING_KEYS}
    return generation_pb2.GenerateRequest(
        request_id=options.get("request_id", ""),
        adapter_id=options.get("adapter", ""),
        route=options.get("route", ""),
        user_key=options.get("user_key", ""),
        cache_salt=options.get("cache_salt", ""),
        prompt=prompt or "",
        messages=_chat(messages),
        sampling=generation_pb2.SamplingParameters(**sampling, constraint=_constraint(options)),
    )


def tokenize_request(prompt: str | None, messages: Sequence[ChatInput] | None) -> generation_pb2.TokenizeRequest:
    return generation_pb2.TokenizeRequest(prompt=prompt or "", messages=_chat(messages))


def _finish_reason(value: generation_pb2.FinishReason.ValueType) -> str | None:
    if value == generation_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return generation_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _usage(message: generation_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens)


def _timings(message: generation_pb2.Timings) -> Timings:
    return Timings(
        queue_wait=message.queue_wait_seconds,
        time_to_first_token=message.time_to_first_token_seconds,
        engine=message.engine_seconds,
        total=message.total_seconds,
    )


def _served_by(message: generation_pb2.ServedBy) -> ServedBy:
    return ServedBy(
        adapter_id=message.adapter_id or None,
        adapter_version=message.adapter_version,
        route=message.route or None,
        variant=message.variant or None,
    )


def generation(message: generation_pb2.GenerateResponse) -> Generation:
    return Generation(
        request_id=message.request_id,
        text=message.text,
        token_ids=tuple(message.token_ids),
        logprobs=tuple(message.logprobs),
        finish_reason=_finish_reason(message.finish_reason) or "",
        usage=_usage(message.usage),
        timings=_timings(message.timings),
        served_by=_served_by(message.served_by),
    )


def stream_chunk(message: generation_pb2.GenerateStreamResponse) -> StreamChunk:
    finish_reason = _finish_reason(message.finish_reason)
    last = finish_reason is not None
    return StreamChunk(
        request_id=message.request_id,
        text=message.text,
        token_ids=tuple(message.token_ids),
        logprobs=tuple(message.logprobs),
        finish_reason=finish_reason,
        usage=_usage(message.usage) if last else None,
        timings=_timings(message.timings) if last else None,
        served_by=_served_by(message.served_by) if last else None,
    )


def tokenization(message: generation_pb2.TokenizeResponse) -> Tokenization:
    return Tokenization(token_ids=tuple(message.token_ids), count=message.count)


def adapter(message: adapters_pb2.Adapter) -> Adapter:
    loaded_at = message.loaded_at.ToDatetime(tzinfo=UTC) if message.HasField("loaded_at") else None
    return Adapter(
        adapter_id=message.adapter_id,
        version=message.version,
        content_hash=message.content_hash,
        rank=message.rank,
        target_modules=tuple(message.target_modules),
        use_dora=message.use_dora,
        size_bytes=message.size_bytes,
        tier=adapters_pb2.ResidencyTier.Name(message.tier).removeprefix("RESIDENCY_TIER_").lower(),
        pinned=message.pinned,
        loaded_at=loaded_at,
        requests_served=message.requests_served,
        files_changed=message.files_changed,
    )


def list_request(limit: int | None) -> adapters_pb2.ListAdaptersRequest:
    if limit is not None and limit < 1:
        raise ValueError(f"limit is {limit}; list at least 1 adapter (None: the server's adapters.list_limit)")
    return adapters_pb2.ListAdaptersRequest(limit=limit or 0)


def adapter_list(message: adapters_pb2.ListAdaptersResponse) -> AdapterList:
    return AdapterList(
        adapters=tuple(adapter(a) for a in message.adapters), total=message.total, truncated=message.truncated
    )


def load_request(adapter_id: str, pin: bool | None) -> adapters_pb2.LoadAdapterRequest:
    request = adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id)
    if pin is not None:
        request.pin = pin
    return request


def server_status(message: server_pb2.ServerStatus) -> ServerStatus:
    return ServerStatus(
        version=message.version,
        base_model=message.base_model,
        accepting=message.accepting,
        running_requests=message.running_requests,
        waiting_requests=message.waiting_requests,
        kv_cache_usage=message.kv_cache_usage,
        adapters_on_device=message.adapters_on_device,
        adapters_on_host=message.adapters_on_host,
        active_streams=message.active_streams,
    )


def health_status(message: health_pb2.HealthCheckResponse) -> str:
    """SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(message.status))
