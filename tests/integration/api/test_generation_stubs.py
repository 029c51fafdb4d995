"""loraplex.v1 Generation through the generated stubs against the real server: results, streaming, status codes,
deadlines and cancellation."""

from __future__ import annotations

import time

import grpc
import pytest

from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.api.helpers import (
    ADAPTERS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_RANK,
    PROMPT,
    request,
    running_requests,
    wait_until_idle,
)
from tests.support.server_process import ServerProcess

Stub = generation_pb2_grpc.GenerationStub


def test_generate_reports_tokens_usage_timings_and_the_serving_adapter(generation: Stub) -> None:
    response = generation.Generate(request(adapter_id=ADAPTERS[0], max_new_tokens=6, ignore_eos=True))
    assert len(response.token_ids) == response.usage.completion_tokens == 6
    assert response.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert response.served_by.adapter_id == ADAPTERS[0] and response.served_by.adapter_version >= 1
    assert response.usage.prompt_tokens == generation.Tokenize(generation_pb2.TokenizeRequest(prompt=PROMPT)).count
    assert len(response.request_id) == 32  # generated: the request named none
    timings = response.timings
    assert 0 <= timings.queue_wait_seconds <= timings.time_to_first_token_seconds <= timings.engine_seconds
    assert timings.engine_seconds <= timings.total_seconds < timings.engine_seconds + 1.0
    base = generation.Generate(request(max_new_tokens=6, ignore_eos=True))
    assert base.served_by.adapter_id == "" and base.served_by.adapter_version == 0
    assert list(base.token_ids) != list(response.token_ids)


def test_the_request_id_is_echoed(generation: Stub) -> None:
    message = request(max_new_tokens=2)
    message.request_id = "client-id-42"
    assert generation.Generate(message).request_id == "client-id-42"
    assert {m.request_id for m in generation.GenerateStream(message)} == {"client-id-42"}


@pytest.mark.parametrize("adapter_id", ["", ADAPTERS[3], ADAPTERS[17]])
def test_streaming_is_token_exact_against_unary(generation: Stub, adapter_id: str) -> None:
    unary = generation.Generate(request(adapter_id=adapter_id, max_new_tokens=12, logprobs=True))
    messages = list(generation.GenerateStream(request(adapter_id=adapter_id, max_new_tokens=12, logprobs=True)))
    *deltas, last = messages
    assert [t for m in deltas for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in deltas) == unary.text
    assert [p for m in deltas for p in m.logprobs] == pytest.approx(list(unary.logprobs))
    assert all(len(m.token_ids) == 1 and m.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for m in deltas)
    assert last.text == "" and not last.token_ids
    assert last.finish_reason == unary.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    assert last.usage == unary.usage and last.served_by == unary.served_by


def test_chat_messages_go_through_the_chat_template(generation: Stub) -> None:
    chat = [generation_pb2.ChatMessage(role="user", content="What is the capital of France?")]
    templated = generation.Tokenize(generation_pb2.TokenizeRequest(messages=chat))
    plain = generation.Tokenize(generation_pb2.TokenizeRequest(prompt="What is the capital of France?"))
    assert templated.count == len(templated.token_ids) > plain.count + 4  # role markers and the generation prompt
    response = generation.Generate(
        generation_pb2.GenerateRequest(messages=chat, sampling=generation_pb2.SamplingParameters(max_new_tokens=8))
    )
    assert response.usage.prompt_tokens == templated.count
    assert "Paris" in response.text


def test_long_prompts_tokenized_off_the_event_loop_generate_as_usual(generation: Stub) -> None:
    long = "word " * 850  # 4250 characters: over OFFLOAD_CHARS, under the token limit
    count = generation.Tokenize(generation_pb2.TokenizeRequest(prompt=long)).count
    unary = generation.Generate(request(prompt=long, max_new_tokens=3, ignore_eos=True))
    streamed = list(generation.GenerateStream(request(prompt=long, max_new_tokens=3, ignore_eos=True)))
    assert unary.usage.prompt_tokens == count == 851
    assert [t for m in streamed for t in m.token_ids] == list(unary.token_ids) and len(unary.token_ids) == 3


def test_logprobs_stop_strings_and_seeded_sampling(generation: Stub) -> None:
    greedy = generation.Generate(request(max_new_tokens=10, logprobs=True, ignore_eos=True))
    assert len(greedy.logprobs) == len(greedy.token_ids) and all(p <= 0 for p in greedy.logprobs)
    stop = greedy.text.strip().split()[1]
    stopped = generation.Generate(request(max_new_tokens=10, stop=[stop]))
    assert stop not in stopped.text and greedy.text.startswith(stopped.text)
    assert stopped.finish_reason == generation_pb2.FINISH_REASON_STOP
    sampled = [generation.Generate(request(max_new_tokens=10, temperature=1.0, seed=1234)).token_ids for _ in "ab"]
    assert list(sampled[0]) == list(sampled[1])


LONG_PROMPT = "word " * (MAX_PROMPT_TOKENS + 20)  # one token a word: tokenized off the event loop
DENSE_PROMPT = "🙂" * (MAX_PROMPT_TOKENS // 2 + 50)  # two tokens a character: short text, too many tokens
HUGE_PROMPT = "x" * (MAX_PROMPT_CHARS + 1)  # refused before any tokenizing
STATUS_CASES = [
    (request(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of 'prompt'"),
    (
        generation_pb2.GenerateRequest(prompt="hi", messages=[generation_pb2.ChatMessage(role="user", content="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one of 'prompt'",
    ),
    (request(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be"),
    (request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
    (request(max_new_tokens=MAX_NEW_TOKENS + 1), grpc.StatusCode.INVALID_ARGUMENT, f"1..{MAX_NEW_TOKENS}"),
    (request(prompt=LONG_PROMPT), grpc.StatusCode.INVALID_ARGUMENT, f"more than the limit of {MAX_PROMPT_TOKENS}"),
    (request(prompt=DENSE_PROMPT), grpc.StatusCode.INVALID_ARGUMENT, f"more than the limit of {MAX_PROMPT_TOKENS}"),
    (request(prompt=HUGE_PROMPT), grpc.StatusCode.INVALID_ARGUMENT, f"server.max_prompt_chars={MAX_PROMPT_CHARS}"),
    (request(adapter_id="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "is not a name"),
    (
        generation_pb2.GenerateRequest(prompt="hi", adapter_id=ADAPTERS[0], route="checkout"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "either adapter_id or route",
    ),
    (
        generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="robot", content="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown chat roles ['robot']",
    ),
    (request(adapter_id="no-such-adapter"), grpc.StatusCode.NOT_FOUND, "adapter 'no-such-adapter' not found"),
    (generation_pb2.GenerateRequest(prompt="hi", route="checkout"), grpc.StatusCode.NOT_FOUND, "unknown route"),
    (request(adapter_id="too-big"), grpc.StatusCode.FAILED_PRECONDITION, f"exceeds the server's maximum {MAX_RANK}"),
    (request(adapter_id="broken"), grpc.StatusCode.FAILED_PRECONDITION, "corrupt or truncated"),
]


@pytest.mark.parametrize(("message", "code", "says"), STATUS_CASES, ids=lambda v: getattr(v, "name", None))
def test_bad_requests_get_their_status_code_and_a_message_saying_what_to_fix(
    generation: Stub, message: generation_pb2.GenerateRequest, code: grpc.StatusCode, says: str
) -> None:
    for call in (generation.Generate, lambda m: list(generation.GenerateStream(m))):
        with pytest.raises(grpc.RpcError) as raised:
            call(message)
        assert raised.value.code() == code
        assert says in raised.value.details()


def test_a_client_deadline_gets_deadline_exceeded_and_frees_the_sequence(
    generation: Stub, channel: grpc.Channel
) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        generation.Generate(request(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True), timeout=0.4)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    assert wait_until_idle(channel) == 0
    assert generation.Generate(request(max_new_tokens=2, ignore_eos=True)).usage.completion_tokens == 2  # serving


def test_a_cancelled_stream_frees_its_slot(generation: Stub, channel: grpc.Channel) -> None:
    stream = generation.GenerateStream(request(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    assert len(next(stream).token_ids) == 1
    assert running_requests(channel) == 1
    stream.cancel()
    assert wait_until_idle(channel) == 0


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server: ServerProcess, channel: grpc.Channel) -> None:
    own = grpc.insecure_channel(server.target)
    stream = generation_pb2_grpc.GenerationStub(own).GenerateStream(
        request(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    )
    next(stream)
    assert running_requests(channel) == 1
    own.close()  # the connection goes away without a cancel from the application
    assert wait_until_idle(channel) == 0
