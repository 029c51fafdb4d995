"""loraplex.v1 protobuf ⇄ engine value types. Pure functions: no I/O, no engine, no gRPC context."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.proto.v1 import adapters_pb2, generation_pb2
from loraplex.server.api.catalog import Listed
from loraplex.server.api.targets import Target
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.types import (
    AdapterInfo,
    ChatMessage,
    Constraint,
    ConstraintKind,
    Finished,
    FinishReason,
    GenerationRequest,
    ResidencyTier,
    SamplingParams,
    TokenDelta,
)

_FINISH_REASONS = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
}
_CONSTRAINT_KINDS = {
    generation_pb2.CONSTRAINT_KIND_JSON_SCHEMA: ConstraintKind.JSON_SCHEMA,
    generation_pb2.CONSTRAINT_KIND_JSON_OBJECT: ConstraintKind.JSON_OBJECT,
    generation_pb2.CONSTRAINT_KIND_REGEX: ConstraintKind.REGEX,
    generation_pb2.CONSTRAINT_KIND_GRAMMAR: ConstraintKind.GRAMMAR,
}
_TIERS = {
    ResidencyTier.DEVICE: adapters_pb2.RESIDENCY_TIER_DEVICE,
    ResidencyTier.HOST: adapters_pb2.RESIDENCY_TIER_HOST,
    ResidencyTier.DISK: adapters_pb2.RESIDENCY_TIER_DISK,
    ResidencyTier.LOADING: adapters_pb2.RESIDENCY_TIER_LOADING,
}


def constraint_of(message: generation_pb2.SamplingParameters) -> Constraint | None:
    if not message.HasField("constraint"):
        return None
    kind = _CONSTRAINT_KINDS.get(message.constraint.kind)
    if kind is None:
        raise InvalidRequest("sampling.constraint.kind must be json_schema, json_object, regex or grammar")
    return Constraint(kind, message.constraint.text)


def sampling_params(message: generation_pb2.SamplingParameters, default_max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=(message.max_new_tokens if message.HasField("max_new_tokens") else default_max_new_tokens),
        temperature=message.temperature,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        repetition_penalty=message.repetition_penalty if message.HasField("repetition_penalty") else 1.0,
        stop=tuple(message.stop),
        logprobs=message.logprobs,
        ignore_eos=message.ignore_eos,
        constraint=constraint_of(message),
    )


def chat_messages(messages: list[generation_pb2.ChatMessage]) -> tuple[ChatMessage, ...] | None:
    return tuple(ChatMessage(role=m.role, content=m.content) for m in messages) or None


def prompt_of(
    prompt: str, messages: list[generation_pb2.ChatMessage]
) -> tuple[str | None, tuple[ChatMessage, ...] | None]:
    """The request's input: exactly one of a non-empty prompt and chat messages."""
    if bool(prompt) == bool(messages):
        raise InvalidRequest("send exactly one of 'prompt' (non-empty text) and 'messages' (chat turns)")
    return prompt or None, chat_messages(messages)


def generation_request(
    message: generation_pb2.GenerateRequest,
    request_id: str,
    target: Target,
    deadline: float | None,
    default_max_new_tokens: int,
    tenant: str,
    tenant_weight: float,
) -> GenerationRequest:
    prompt, messages = prompt_of(message.prompt, list(message.messages))
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        messages=messages,
        adapter_id=target.adapter_id,
        sampling=sampling_params(message.sampling, default_max_new_tokens),
        deadline=deadline,
        tenant=tenant,
        tenant_weight=tenant_weight,
        cache_salt=message.cache_salt or None,
    )


@dataclass(frozen=True)
class Summary:
    """The parts of the last message of a generation, shared by the unary and the streaming response."""

    finish_reason: generation_pb2.FinishReason.ValueType
    usage: generation_pb2.Usage
    timings: generation_pb2.Timings
    served_by: generation_pb2.ServedBy


def summary(finished: Finished, target: Target, total_seconds: float) -> Summary:
    return Summary(
        finish_reason=_FINISH_REASONS[finished.finish_reason],
        usage=generation_pb2.Usage(
            prompt_tokens=finished.usage.prompt_tokens, completion_tokens=finished.usage.completion_tokens
        ),
        timings=generation_pb2.Timings(
            queue_wait_seconds=finished.timings.queue_wait,
            time_to_first_token_seconds=finished.timings.time_to_first_token,
            engine_seconds=finished.timings.total,
            total_seconds=total_seconds,
        ),
        served_by=generation_pb2.ServedBy(
            adapter_id=finished.adapter_id or "",
            adapter_version=finished.adapter_version,
            route=target.route,
            variant=target.variant,
        ),
    )


def generate_response(
    request_id: str, text: str, token_ids: list[int], logprobs: list[float], last: Summary
) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        request_id=request_id,
        text=text,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=last.finish_reason,
        usage=last.usage,
        timings=last.timings,
        served_by=last.served_by,
    )


def delta_message(request_id: str, delta: TokenDelta) -> generation_pb2.GenerateStreamResponse:
    return generation_pb2.GenerateStreamResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids, logprobs=delta.logprobs or ()
    )


def last_stream_message(request_id: str, last: Summary) -> generation_pb2.GenerateStreamResponse:
    return generation_pb2.GenerateStreamResponse(
        request_id=request_id,
        finish_reason=last.finish_reason,
        usage=last.usage,
        timings=last.timings,
        served_by=last.served_by,
    )


def adapter_message(info: AdapterInfo) -> adapters_pb2.Adapter:
    loaded_at = Timestamp()
    loaded_at.FromNanoseconds(int(info.loaded_at * 1e9))
    return adapters_pb2.Adapter(
        adapter_id=info.adapter_id,
        version=info.version,
        content_hash=info.content_hash,
        rank=info.rank,
        target_modules=info.target_modules,
        use_dora=info.use_dora,
        size_bytes=info.size_bytes,
        tier=_TIERS[info.tier],
        pinned=info.pinned,
        loaded_at=loaded_at,
        requests_served=info.requests_served,
    )


def listed_message(listed: Listed) -> adapters_pb2.Adapter:
    """An adapter of a listing: all its fields when a version is in memory, else only its id and tier."""
    if listed.info is None:
        return adapters_pb2.Adapter(adapter_id=listed.adapter_id, tier=_TIERS[listed.tier])
    message = adapter_message(listed.info)
    message.files_changed = listed.files_changed
    return message
