"""OpenAI JSON ⇄ engine value types, for completions and chat completions. Pure functions: no I/O, no engine.

Requests become a :class:`Spec` (what to generate, how, for which ``model``), with everything loraplex cannot do
refused by name: ``n`` other than 1, top-``k`` alternatives in ``logprobs``/``top_logprobs`` (the engine reports
the sampled token's log-probability only), penalties other than ``repetition_penalty``, tools. Structured output
(``response_format`` or vLLM's ``guided_*``) becomes the engine's :class:`Constraint`, which the engine compiles
(an uncompilable one is its InvalidRequest).
Engine events become OpenAI's bodies and stream chunks; each names what served it in ``model`` (the adapter id, or
``base``) and carries loraplex's own ``loraplex`` object (request id, adapter, version, route, variant).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from loraplex.server.api.http.errors import InvalidField
from loraplex.server.api.http.schemas import ChatCompletionRequest, ChatMessageIn, CompletionRequest, SamplingFields
from loraplex.server.api.targets import Target
from loraplex.server.core.types import (
    ChatMessage,
    Constraint,
    ConstraintKind,
    Finished,
    SamplingParams,
    TokenDelta,
    Usage,
)
from loraplex.server.routing.routes import BASE_MODEL

Kind = Literal["completion", "chat"]
_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
_OBJECTS: dict[tuple[Kind, bool], str] = {  # (kind, a stream chunk) -> the "object" of the JSON
    ("completion", False): "text_completion",
    ("completion", True): "text_completion",
    ("chat", False): "chat.completion",
    ("chat", True): "chat.completion.chunk",
}


@dataclass(frozen=True)
class Spec:
    """A generation as an HTTP request asks for it, before its target is resolved."""

    kind: Kind
    model: str
    user_key: str
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    cache_salt: str | None = None


def _refuse_unsupported(body: SamplingFields) -> None:
    if body.n not in (None, 1):
        raise InvalidField(f"n must be 1 (got {body.n}): loraplex returns one choice; send n requests instead", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise InvalidField(f"{name} is not supported; use repetition_penalty", name)
    if body.logit_bias:
        raise InvalidField("logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise InvalidField("stream_options is only for stream: true", "stream_options")


def _response_format(value: dict[str, Any]) -> Constraint | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind != "json_schema":
        raise InvalidField(
            f"response_format.type must be text, json_object or json_schema (got {kind!r})", "response_format"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
        raise InvalidField(
            'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}', "response_format"
        )
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(spec.get("schema", {})))


def _constraint(body: SamplingFields) -> Constraint | None:
    """The structured output asked for: ``response_format`` or one of vLLM's ``guided_*`` fields, not both."""
    given: list[Constraint | None] = []
    if body.response_format is not None:
        given.append(_response_format(body.response_format))
    if body.guided_json is not None:
        schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        given.append(Constraint(ConstraintKind.JSON_SCHEMA, schema))
    if body.guided_regex is not None:
        given.append(Constraint(ConstraintKind.REGEX, body.guided_regex))
    if body.guided_grammar is not None:
        given.append(Constraint(ConstraintKind.GRAMMAR, body.guided_grammar))
    constraints = [c for c in given if c is not None]
    if len(constraints) > 1:
        raise InvalidField("send one of response_format, guided_json, guided_regex, guided_grammar", "response_format")
    return constraints[0] if constraints else None


def _sampling(body: SamplingFields, max_tokens: int | None, logprobs: bool, default_max: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_new_tokens=default_max if max_tokens is None else max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop=stop,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        constraint=_constraint(body),
    )


def _spec(body: SamplingFields, kind: Kind, sampling: SamplingParams, **prompt: Any) -> Spec:
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return Spec(
        kind, body.model, body.user or "", sampling, body.stream, include_usage, cache_salt=body.cache_salt, **prompt
    )


def completion_spec(body: CompletionRequest, default_max: int) -> Spec:
    _refuse_unsupported(body)
    if body.echo:
        raise InvalidField("echo is not supported", "echo")
    if body.suffix:
        raise InvalidField("suffix is not supported", "suffix")
    if body.best_of not in (None, 1):
        raise InvalidField(f"best_of must be 1 (got {body.best_of})", "best_of")
    if body.logprobs not in (None, 0):
        raise InvalidField(
            f"logprobs={body.logprobs} asks for top alternatives, which loraplex does not return; "
            "use logprobs: 0 for the sampled tokens' log-probabilities",
            "logprobs",
        )
    sampling = _sampling(body, body.max_tokens, body.logprobs == 0, default_max)
    prompt = body.prompt
    if isinstance(prompt, str):
        return _spec(body, "completion", sampling, prompt=prompt)
    if not prompt:
        raise InvalidField("prompt is empty", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return _spec(body, "completion", sampling, prompt_token_ids=tuple(int(i) for i in prompt))
    if len(prompt) != 1:
        raise InvalidField(f"send one prompt per request (got {len(prompt)})", "prompt")
    return _spec(body, "completion", sampling, prompt=str(prompt[0]))


def _chat_message(index: int, message: ChatMessageIn) -> ChatMessage:
    content = message.content
    if isinstance(content, list):
        kinds = sorted({part.type for part in content} - {"text"})
        if kinds:
            raise InvalidField(f"only text content parts are supported (got {kinds})", f"messages[{index}].content")
        content = "".join(part.text or "" for part in content)
    return ChatMessage(role=_ROLES.get(message.role, message.role), content=content or "")


def chat_spec(body: ChatCompletionRequest, default_max: int) -> Spec:
    _refuse_unsupported(body)
    if body.top_logprobs:
        raise InvalidField(
            "top_logprobs is not supported: loraplex returns the sampled token's log-probability only "
            "(logprobs: true, top_logprobs: 0)",
            "top_logprobs",
        )
    if body.tools:
        raise InvalidField("tools are not supported", "tools")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = _sampling(body, max_tokens, body.logprobs, default_max)
    messages = tuple(_chat_message(i, m) for i, m in enumerate(body.messages))
    return _spec(body, "chat", sampling, messages=messages)


# ------------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Head:
    """What every body and chunk of one response repeats."""

    kind: Kind
    id: str
    created: int
    request_id: str
    target: Target

    @property
    def model(self) -> str:
        return self.target.adapter_id or BASE_MODEL

    def loraplex(self, finished: Finished | None = None) -> dict[str, Any]:
        served: dict[str, Any] = {
            "request_id": self.request_id,
            "adapter_id": self.target.adapter_id,
            "route": self.target.route or None,
            "variant": self.target.variant or None,
        }
        if finished is not None:
            served["adapter_version"] = finished.adapter_version
        return served

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = _OBJECTS[self.kind, chunk]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def logprobs_json(kind: Kind, tokens: list[str], logprobs: list[float], offset: int = 0) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice: per token (its text and log-probability), no alternatives."""
    if kind == "chat":
        content = [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, logprobs, strict=False)
        ]
        return {"content": content}
    offsets: list[int] = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def _choice(kind: Kind, text: str, delta: bool, first: bool = False) -> dict[str, Any]:
    if kind == "completion":
        return {"index": 0, "text": text}
    if not delta:
        return {"index": 0, "message": {"role": "assistant", "content": text}}
    return {"index": 0, "delta": {"role": "assistant", "content": text} if first else {"content": text}}


def body(head: Head, text: str, logprobs: dict[str, Any] | None, finished: Finished) -> dict[str, Any]:
    """The whole (non-streaming) response."""
    choice = {
        **_choice(head.kind, text, delta=False),
        "logprobs": logprobs,
        "finish_reason": str(finished.finish_reason),
    }
    return {
        **head.envelope(chunk=False),
        "choices": [choice],
        "usage": usage_json(finished.usage),
        "loraplex": head.loraplex(finished),
    }


def chunk(
    head: Head, delta: TokenDelta | None, logprobs: dict[str, Any] | None, include_usage: bool, first: bool
) -> dict[str, Any]:
    """A stream chunk with the new text of ``delta`` (None: the opening chunk of a chat, role only)."""
    choice = {**_choice(head.kind, delta.text if delta else "", True, first), "logprobs": logprobs}
    message = {**head.envelope(chunk=True), "choices": [{**choice, "finish_reason": None}]}
    if include_usage:
        message["usage"] = None
    message["loraplex"] = head.loraplex()
    return message


def last_chunk(head: Head, finished: Finished, include_usage: bool) -> dict[str, Any]:
    choice = {**_choice(head.kind, "", True), "logprobs": None, "finish_reason": str(finished.finish_reason)}
    message = {**head.envelope(chunk=True), "choices": [choice]}
    if include_usage:
        message["usage"] = None
    message["loraplex"] = head.loraplex(finished)
    return message


def usage_chunk(head: Head, finished: Finished) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {
        **head.envelope(chunk=True),
        "choices": [],
        "usage": usage_json(finished.usage),
        "loraplex": head.loraplex(finished),
    }
