"""``loraplex.client``: the blocking and the asyncio client against the real server, typed results and typed
exceptions for each status code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from loraplex.client import (
    AsyncClient,
    ChatMessage,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)
from loraplex.proto.v1 import generation_pb2_grpc
from tests.integration.api.helpers import ADAPTERS, MAX_NEW_TOKENS, PROMPT, request, wait_until_idle
from tests.support.server_process import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=60) as opened:
        yield opened


def test_generate_and_stream_return_typed_results_that_agree(
    client: Client, generation: generation_pb2_grpc.GenerationStub
) -> None:
    result = client.generate(PROMPT, adapter=ADAPTERS[4], max_new_tokens=8, logprobs=True, request_id="c-1")
    ours = generation.Generate(request(adapter_id=ADAPTERS[4], max_new_tokens=8))
    assert (result.text, result.token_ids) == (ours.text, tuple(ours.token_ids))
    assert result.request_id == "c-1" and len(result.logprobs) == len(result.token_ids)
    assert result.served_by.adapter_id == ADAPTERS[4] and result.served_by.route is None
    assert result.finish_reason in ("stop", "length") and result.usage.completion_tokens == len(result.token_ids)
    chunks = list(client.stream(PROMPT, adapter=ADAPTERS[4], max_new_tokens=8))
    assert "".join(c.text for c in chunks) == result.text
    assert tuple(t for c in chunks for t in c.token_ids) == result.token_ids
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage == result.usage and chunks[-1].served_by == result.served_by


def test_chat_tokenize_and_admin(client: Client) -> None:
    chat = [ChatMessage("system", "Answer in one word."), ChatMessage("user", "What is the capital of France?")]
    answer = client.chat(chat, max_new_tokens=6)
    assert "Paris" in answer.text
    assert "".join(c.text for c in client.chat_stream(chat, max_new_tokens=6)) == answer.text
    assert client.tokenize(chat=chat).count == answer.usage.prompt_tokens
    assert client.tokenize("hello world").token_ids == client.tokenize(prompt="hello world").token_ids
    loaded = client.load_adapter(ADAPTERS[11], pin=True)
    assert (loaded.adapter_id, loaded.pinned, loaded.rank, loaded.target_modules) == (
        ADAPTERS[11],
        True,
        8,
        ("q_proj", "v_proj"),
    )
    assert client.get_adapter(ADAPTERS[11]).tier in ("host", "device")
    assert ADAPTERS[11] in [a.adapter_id for a in client.list_adapters()]
    assert client.load_adapter(ADAPTERS[11], pin=False).pinned is False
    assert client.status().accepting and client.health() == "SERVING"
    assert client.health("inference.GRPCInferenceService") == "SERVING"


def test_chat_takes_openai_style_dicts_beside_chat_messages(client: Client, server: ServerProcess) -> None:
    typed = client.chat([ChatMessage("user", "Name a planet.")], max_new_tokens=4)
    plain = client.chat([{"role": "user", "content": "Name a planet."}], max_new_tokens=4)
    assert plain.token_ids == typed.token_ids and len(typed.token_ids) >= 1
    streamed = client.chat_stream([{"role": "user", "content": "Name a planet."}], max_new_tokens=4)
    assert tuple(t for c in streamed for t in c.token_ids) == typed.token_ids
    assert client.tokenize(chat=[{"role": "user", "content": "Name a planet."}]).count == typed.usage.prompt_tokens

    async def asynchronously() -> tuple[int, ...]:
        async with AsyncClient(server.target) as aclient:
            return (await aclient.chat([{"role": "user", "content": "Name a planet."}], max_new_tokens=4)).token_ids

    assert asyncio.run(asynchronously()) == typed.token_ids
    with pytest.raises(ValueError, match=r"chat\[0\]: no 'content'"):
        client.chat([{"role": "user"}])


def test_list_adapters_names_those_on_disk_and_says_when_it_is_cut(client: Client) -> None:
    client.load_adapter(ADAPTERS[15])
    listing = client.list_adapters()
    by_id = {a.adapter_id: a for a in listing}
    assert (listing.truncated, listing.total, len(listing)) == (False, len(by_id), len(by_id))
    assert by_id["broken"].version == 0 and by_id["broken"].tier == "disk" and by_id["broken"].loaded_at is None
    assert by_id[ADAPTERS[15]].version >= 1 and by_id[ADAPTERS[15]].loaded_at is not None
    cut = client.list_adapters(limit=1)
    assert (len(cut), cut.truncated, cut.total) == (1, True, listing.total) and cut[0].version >= 1
    with pytest.raises(ValueError, match="limit is 0"):
        client.list_adapters(limit=0)


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (lambda c: c.generate(""), InvalidArgumentError, "exactly one of"),
        (lambda c: c.generate(PROMPT, temperature=-2.0), InvalidArgumentError, "temperature"),
        (lambda c: c.generate(PROMPT, adapter="nope"), NotFoundError, "not found"),
        (lambda c: c.generate(PROMPT, route="checkout"), NotFoundError, "unknown route"),
        (lambda c: c.get_adapter("never-loaded"), NotFoundError, "not loaded"),
        (lambda c: list(c.stream(PROMPT, adapter="too-big")), FailedPreconditionError, "exceeds"),
        (
            lambda c: c.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, timeout=0.3),
            DeadlineExceededError,
            "",
        ),
    ],
)
def test_failures_raise_the_exception_of_their_code(client: Client, call: object, error: type, says: str) -> None:
    with pytest.raises(error) as raised:
        call(client)  # type: ignore[operator]
    assert isinstance(raised.value, LoraplexError) and says in raised.value.message
    assert raised.value.code.name in str(raised.value)


def test_closing_a_stream_early_cancels_the_request(client: Client, channel: grpc.Channel) -> None:
    chunks = client.stream(PROMPT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    assert len(next(chunks).token_ids) == 1
    chunks.close()
    assert wait_until_idle(channel) == 0


def test_unreachable_servers_raise_unavailable_after_backing_off() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.2)
    started = time.monotonic()
    with Client("127.0.0.1:1", retry=policy, timeout=10) as unreachable, pytest.raises(UnavailableError):
        unreachable.generate(PROMPT)
    assert 0.2 <= time.monotonic() - started < 5  # two retries, each after 0.1-0.2 s


def test_the_async_client(server: ServerProcess, client: Client, channel: grpc.Channel) -> None:
    expected = client.generate(PROMPT, adapter=ADAPTERS[8], max_new_tokens=8)

    async def scenario() -> None:
        async with AsyncClient(server.target) as aclient:
            results = await asyncio.gather(
                *(aclient.generate(PROMPT, adapter=ADAPTERS[8], max_new_tokens=8) for _ in "abc")
            )
            assert {r.text for r in results} == {expected.text}
            chunks = [c async for c in aclient.stream(PROMPT, adapter=ADAPTERS[8], max_new_tokens=8)]
            assert "".join(c.text for c in chunks) == expected.text and chunks[-1].is_last
            chat = [ChatMessage("user", "Say hello.")]
            assert (await aclient.chat(chat, max_new_tokens=4)).usage.prompt_tokens == (
                await aclient.tokenize(chat=chat)
            ).count
            assert ADAPTERS[8] in [a.adapter_id for a in await aclient.list_adapters()]
            assert (await aclient.status()).accepting and await aclient.health() == "SERVING"
            with pytest.raises(NotFoundError):
                await aclient.generate(PROMPT, adapter="nope")
            with pytest.raises(DeadlineExceededError):
                await aclient.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, timeout=0.3)
            stream = aclient.stream(PROMPT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
            await anext(stream)
            await stream.aclose()

    asyncio.run(scenario())
    assert wait_until_idle(channel) == 0
