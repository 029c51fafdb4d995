"""The HTTP API's pure parts: OpenAI JSON → engine requests (what is refused, by name), and the one table that
maps every typed error to an HTTP status and OpenAI error type."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from loraplex.server.api.errors import ENGINE_CODES, ROUTING_CODES, UPLOAD_CODES, PermissionDenied, Unauthenticated
from loraplex.server.api.http.convert import chat_spec, completion_spec
from loraplex.server.api.http.errors import HTTP_STATUS, InvalidField, body_too_large, reply_of
from loraplex.server.api.http.schemas import ChatCompletionRequest, CompletionRequest
from loraplex.server.core.errors import AdapterNotFound, Overloaded, ShuttingDown
from loraplex.server.core.types import ChatMessage, SamplingParams

CHAT = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CHAT, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


def test_openai_fields_become_engine_sampling_parameters() -> None:
    spec = chat_spec_of(max_completion_tokens=9, max_tokens=3, temperature=0, top_p=0.5, seed=7, stop="x", user="u")
    assert spec.sampling == SamplingParams(max_new_tokens=9, temperature=0.0, top_p=0.5, seed=7, stop=("x",))
    assert (spec.model, spec.user_key, spec.kind, spec.stream, spec.include_usage) == ("m", "u", "chat", False, False)
    defaults = chat_spec(chat(), default_max=5).sampling
    assert (defaults.max_new_tokens, defaults.temperature, defaults.top_p, defaults.logprobs) == (5, 1.0, 1.0, False)


def chat_spec_of(**fields: Any) -> Any:
    return chat_spec(chat(**fields), default_max=8)


def test_messages_and_prompts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    spec = chat_spec(chat(messages=[{"role": "developer", "content": "s"}, {"role": "user", "content": parts}]), 8)
    assert spec.messages == (ChatMessage("system", "s"), ChatMessage("user", "ab"))
    assert completion_spec(completion(prompt=["only"]), 8).prompt == "only"
    assert completion_spec(completion(prompt=[1, 2, 3]), 8).prompt_token_ids == (1, 2, 3)
    streamed = completion_spec(completion(stream=True, stream_options={"include_usage": True}, logprobs=0), 8)
    assert (streamed.stream, streamed.include_usage, streamed.sampling.logprobs) == (True, True, True)


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: chat_spec(chat(n=2), 8), "n"),
        (lambda: chat_spec(chat(top_logprobs=1, logprobs=True), 8), "top_logprobs"),
        (lambda: chat_spec(chat(presence_penalty=0.5), 8), "presence_penalty"),
        (lambda: chat_spec(chat(tools=[{"type": "function"}]), 8), "tools"),
        (lambda: chat_spec(chat(response_format={"type": "json_schema"}), 8), "response_format"),
        (lambda: chat_spec(chat(stream_options={"include_usage": True}), 8), "stream_options"),
        (
            lambda: chat_spec(chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 8),
            "messages[0].content",
        ),
        (lambda: completion_spec(completion(logprobs=1), 8), "logprobs"),
        (lambda: completion_spec(completion(echo=True), 8), "echo"),
        (lambda: completion_spec(completion(prompt=["a", "b"]), 8), "prompt"),
        (lambda: completion_spec(completion(prompt=[]), 8), "prompt"),
    ],
)
def test_what_loraplex_cannot_do_is_refused_by_name(build: Any, param: str) -> None:
    with pytest.raises(InvalidField) as refused:
        build()
    assert refused.value.param == param and str(refused.value)
    assert reply_of(refused.value).status.status == 400


def test_every_typed_error_has_an_http_status() -> None:
    codes = {*ENGINE_CODES.values(), *ROUTING_CODES.values(), *UPLOAD_CODES.values(), Unauthenticated.code}
    assert codes | {PermissionDenied.code} <= set(HTTP_STATUS)


@pytest.mark.parametrize(
    ("error", "status", "kind", "retry_after"),
    [
        (AdapterNotFound("adapter 'x' not found"), 404, "not_found_error", None),
        (Overloaded("queue full"), 429, "rate_limit_error", 1),
        (ShuttingDown("draining"), 503, "service_unavailable_error", 5),
        (Unauthenticated("missing bearer token"), 401, "authentication_error", None),
        (PermissionDenied("tenant 'a' may not use adapter 'b'"), 403, "permission_error", None),
        (body_too_large(1024), 413, "invalid_request_error", None),
        (RuntimeError("a bug"), 500, "server_error", None),
    ],
)
def test_errors_become_openai_error_json(error: Exception, status: int, kind: str, retry_after: int | None) -> None:
    reply = reply_of(error)
    assert (reply.status.status, reply.status.type, reply.status.retry_after_s) == (status, kind, retry_after)
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert "a bug" not in reply.body["error"]["message"]  # unexpected errors never leak their text


def test_the_grpc_code_names_the_error() -> None:
    assert reply_of(AdapterNotFound("x")).body["error"]["code"] == grpc.StatusCode.NOT_FOUND.name.lower()
