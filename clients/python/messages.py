"""Requests built from plain Python values, and protobuf responses turned into the client's typed results."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

from grpc_health.v1 import health_pb2

from loraplex.client.types import (
    SAMPLING_KEYS,
    Adapter,
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


def _chat(messages: Sequence[ChatMessage] | None) -> list[generation_pb2.ChatMessage]:
    return [generation_pb2.ChatMessage(role=m.role, content=m.content) for m in messages or ()]


def generate_request(
    prompt: str | None, messages: Sequence[ChatMessage] | None, options: GenerateOptions
) -> generation_pb2.GenerateRequest:
    sampling: dict[str, Any] = {key: value for key, value in options.items() if key in SAMPLING_KEYS}
    return generation_pb2.GenerateRequest(
        request_id=options.get("request_id", ""),
        adapter_id=options.get("adapter", ""),
        route=options.get("route", ""),
        user_key=options.get("user_key", ""),
        prompt=prompt or "",
        messages=_chat(messages),
        sampling=generation_pb2.SamplingParameters(**sampling),
    )


def tokenize_request(prompt: str | None, messages: Sequence[ChatMessage] | None) -> generation_pb2.TokenizeRequest:
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
        loaded_at=message.loaded_at.ToDatetime(tzinfo=UTC),
        requests_served=message.requests_served,
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
