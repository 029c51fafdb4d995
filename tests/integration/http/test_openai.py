"""The OpenAI-compatible API on a real server, driven by the official ``openai`` SDK (sync and async, streaming
and not): answers token-exact with gRPC's, streams that concatenate to the whole answer, usage and log-probs, A/B
routes with a sticky ``user``, the model list, vLLM's adapter load/unload, health, every error status a bad
request causes, and 503 while the server drains (the module's last test: it stops the server)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loraplex.client import Client
from loraplex.client.types import Route, Variant
from tests.integration.http.conftest import (
    CHAT,
    MAX_BODY_BYTES,
    MAX_NEW_TOKENS,
    PROMPT,
    async_openai_client,
    error_of,
    get,
    openai_client,
    post,
    start_server,
)
from tests.integration.routing.conftest import scrape
from tests.support.server_process import ServerProcess, stopping_cleanly

ROUTE = "checkout-ab"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http_adapter_root: Path) -> Iterator[ServerProcess]:
    with stopping_cleanly(start_server(tmp_path_factory.mktemp("http-open"), http_adapter_root)) as process:
        yield process


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server)


def chat(oai: openai.OpenAI, model: str, max_tokens: int = 8, **kwargs: Any) -> Any:
    return oai.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=max_tokens, **kwargs)


@pytest.mark.parametrize("model", ["alpha", "team-a/one", "base"])
def test_a_greedy_chat_answer_equals_the_grpc_answer(oai: openai.OpenAI, grpc_client: Client, model: str) -> None:
    answer = chat(oai, model, max_tokens=12)
    adapter = {} if model == "base" else {"adapter": model}
    expected = grpc_client.chat(CHAT, max_new_tokens=12, **adapter)
    choice = answer.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model == model and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    served = answer.model_extra["loraplex"]
    assert served["adapter_id"] == (None if model == "base" else model) and served["route"] is None


def test_adapters_answer_differently_from_each_other_and_the_base(oai: openai.OpenAI) -> None:
    answers = {model: chat(oai, model).choices[0].message.content for model in ("base", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers


def test_a_greedy_completion_with_logprobs_equals_the_grpc_answer(oai: openai.OpenAI, grpc_client: Client) -> None:
    answer = oai.completions.create(model="beta", prompt=PROMPT, temperature=0, max_tokens=12, logprobs=0)
    expected = grpc_client.generate(PROMPT, adapter="beta", max_new_tokens=12, logprobs=True)
    choice = answer.choices[0]
    assert choice.text == expected.text and answer.model == "beta" and answer.object == "text_completion"
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs == pytest.approx(list(expected.logprobs), abs=1e-4)
    assert "".join(choice.logprobs.tokens or ()) == expected.text
    assert choice.logprobs.text_offset == [
        sum(len(t) for t in (choice.logprobs.tokens or ())[:i]) for i in range(len(expected.logprobs))
    ]


def test_the_base_models_own_name_means_base(oai: openai.OpenAI, server: ServerProcess) -> None:
    base = next(m for m in oai.models.list().data if m.id == "base")
    assert base.model_extra["root"] == "embedded"
    embedded = chat(oai, "embedded", max_tokens=6)
    assert embedded.model == "base"
    assert embedded.choices[0].message.content == chat(oai, "base", max_tokens=6).choices[0].message.content


def test_chat_logprobs_name_each_token(oai: openai.OpenAI) -> None:
    answer = chat(oai, "alpha", max_tokens=8, logprobs=True)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 8
    assert "".join(item.token for item in content) == answer.choices[0].message.content
    assert all(item.logprob <= 0 and item.top_logprobs == [] for item in content)


@pytest.mark.parametrize("model", ["alpha", "base"])
def test_a_stream_concatenates_to_the_whole_answer_with_usage_last(oai: openai.OpenAI, model: str) -> None:
    whole = chat(oai, model, max_tokens=12)
    chunks = list(chat(oai, model, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and {c.model for c in chunks} == {model}
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_a_completion_stream_without_usage_and_the_raw_sse_framing(oai: openai.OpenAI, server: ServerProcess) -> None:
    whole = oai.completions.create(model="gamma", prompt=PROMPT, temperature=0, max_tokens=10)
    chunks = list(oai.completions.create(model="gamma", prompt=PROMPT, temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    body = {"model": "gamma", "prompt": PROMPT, "temperature": 0, "max_tokens": 3, "stream": True}
    raw = post(server, "/v1/completions", json=body)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_the_async_client_streams_and_answers_concurrently(server: ServerProcess, oai: openai.OpenAI) -> None:
    models = ("alpha", "beta", "gamma", "base")
    expected = {m: chat(oai, m, max_tokens=12).choices[0].message.content for m in models}

    async def run() -> dict[str, tuple[str, str]]:
        client = async_openai_client(server)

        async def one(model: str) -> tuple[str, str]:
            kwargs: Any = {"model": model, "messages": CHAT, "temperature": 0, "max_tokens": 12}
            whole = await client.chat.completions.create(**kwargs)
            stream = await client.chat.completions.create(**kwargs, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content or "", "".join(parts)

        try:
            results = await asyncio.gather(*(one(m) for m in models))
        finally:
            await client.close()
        return dict(zip(models, results, strict=True))

    assert asyncio.run(run()) == {m: (expected[m], expected[m]) for m in models}


def test_a_route_sends_each_user_to_one_variant(oai: openai.OpenAI, grpc_client: Client) -> None:
    grpc_client.set_route(Route(ROUTE, (Variant("control", "alpha", 50), Variant("treatment", "beta", 50))))
    direct = {m: chat(oai, m, max_tokens=4).choices[0].message.content for m in ("alpha", "beta")}
    seen: dict[str, set[str]] = {}
    for user in [f"user-{i}" for i in range(8)]:
        for _ in range(2):
            answer = chat(oai, ROUTE, max_tokens=4, user=user)
            served = answer.model_extra["loraplex"]
            assert served["route"] == ROUTE and answer.model == served["adapter_id"]
            assert served["variant"] == {"alpha": "control", "beta": "treatment"}[answer.model]
            assert answer.choices[0].message.content == direct[answer.model]
            seen.setdefault(user, set()).add(served["variant"])
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert set().union(*seen.values()) == {"control", "treatment"}


def test_the_model_list_names_the_base_every_adapter_and_the_routes(oai: openai.OpenAI, grpc_client: Client) -> None:
    grpc_client.set_route(Route("listed-route", (Variant("only", "gamma", 100),)))
    models = {m.id: m for m in oai.models.list().data}
    adapters = {"alpha", "beta", "gamma", "team-a/one", "team-b/one", "team-b/spare"}
    assert adapters | {"base", "listed-route"} <= set(models)
    assert all(models[a].model_extra["parent"] == "base" for a in adapters)
    assert all(models[a].owned_by == "loraplex" and models[a].object == "model" for a in models)
    assert models["base"].model_extra["parent"] is None
    assert models["listed-route"].model_extra["loraplex"]["kind"] == "route"
    assert models["listed-route"].model_extra["loraplex"]["variants"] == [
        {"name": "only", "adapter": "gamma", "weight": 100.0}
    ]


def test_vllm_load_and_unload_then_serve(server: ServerProcess, oai: openai.OpenAI, http_adapter_root: Path) -> None:
    loaded = post(
        server,
        "/v1/load_lora_adapter",
        json={"lora_name": "team-b/spare", "lora_path": str(http_adapter_root / "team-b/spare")},
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == "team-b/spare" and loaded.json()["version"] >= 1
    tiers = {m.id: m.model_extra["loraplex"].get("tier") for m in oai.models.list().data}
    assert tiers["team-b/spare"] in ("device", "host")
    answer = chat(oai, "team-b/spare", max_tokens=8)
    assert answer.model == "team-b/spare" and answer.model_extra["loraplex"]["adapter_version"] >= 1
    relative = post(server, "/v1/load_lora_adapter", json={"lora_name": "team-b/spare", "lora_path": "team-b/spare"})
    assert relative.status_code == 200, relative.text
    unloaded = post(server, "/v1/unload_lora_adapter", json={"lora_name": "team-b/spare"})
    assert unloaded.status_code == 200, unloaded.text
    tiers = {m.id: m.model_extra["loraplex"].get("tier") for m in oai.models.list().data}
    assert tiers["team-b/spare"] == "disk"
    with pytest.raises(openai.NotFoundError, match="unloaded"):
        chat(oai, "team-b/spare", max_tokens=8)
    assert post(server, "/v1/load_lora_adapter", json={"lora_name": "team-b/spare"}).status_code == 200
    assert chat(oai, "team-b/spare", max_tokens=8).choices[0].message.content == answer.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"lora_name": "alpha", "lora_path": "/etc"}, "lora_path", "lora_path must be the directory"),
        ({"lora_name": "alpha", "lora_path": "../alpha/../beta"}, "lora_path", "lora_path must be the directory"),
        ({"lora_name": "alpha", "lora_path": "alpha\x00"}, "lora_path", "lora_path must be the directory"),  # fuzzed
        ({"lora_name": "alpha", "lora_path": "~no-such-user/alpha"}, "lora_path", "lora_path must be the directory"),
        ({"lora_name": "../escape"}, "lora_name", "is not a name"),
        ({"lora_path": "alpha"}, "lora_name", "Field required"),
    ],
)
def test_load_refuses_paths_that_are_not_the_adapters_own_directory(
    server: ServerProcess, body: dict[str, Any], param: str, says: str
) -> None:
    response = post(server, "/v1/load_lora_adapter", json=body)
    error = error_of(response)
    assert (response.status_code, error["param"], error["type"]) == (400, param, "invalid_request_error")
    assert says in error["message"]


def test_health_and_readiness(server: ServerProcess) -> None:
    assert get(server, "/health").json() == {"status": "ok", "phase": "serving"}
    ready = get(server, "/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "phase": "serving"})


def _chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "alpha", "messages": CHAT, "max_tokens": 4, **fields}


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "says"),
    [
        ("/v1/chat/completions", _chat_body(n=2), 400, "n", "n must be 1"),
        ("/v1/chat/completions", _chat_body(logprobs=True, top_logprobs=3), 400, "top_logprobs", "not supported"),
        ("/v1/completions", {"model": "alpha", "prompt": PROMPT, "logprobs": 2}, 400, "logprobs", "top alternatives"),
        ("/v1/chat/completions", _chat_body(temperature=-1), 400, None, "temperature must be"),
        ("/v1/chat/completions", _chat_body(max_tokens=MAX_NEW_TOKENS + 1), 400, None, "max_new_tokens must be"),
        ("/v1/chat/completions", {"model": "alpha"}, 400, "messages", "Field required"),
        ("/v1/chat/completions", _chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, None, "roles"),
        ("/v1/chat/completions", _chat_body(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
        (
            "/v1/chat/completions",
            _chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}}),
            400,
            None,
            "does not compile: Invalid type",
        ),
        ("/v1/completions", {"model": "alpha", "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
        ("/v1/chat/completions", _chat_body(model="no-such-adapter"), 404, None, "not found"),
        ("/v1/completions", {"model": "", "prompt": PROMPT}, 400, None, "model_name is empty"),
        ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404, None, "never-loaded"),
        ("/v1/no-such-endpoint", {}, 404, None, "no route"),
    ],
)
def test_bad_requests_get_openai_errors_with_the_right_status(
    server: ServerProcess, path: str, body: dict[str, Any], status: int, param: str | None, says: str
) -> None:
    response = post(server, path, json=body)
    error = error_of(response)
    assert (response.status_code, error["param"]) == (status, param), error
    assert says in error["message"]


def test_a_body_that_is_not_json_is_400_and_one_over_the_size_limit_is_413(server: ServerProcess) -> None:
    response = post(server, "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert (response.status_code, error_of(response)["type"]) == (400, "invalid_request_error")
    for body, says in ((b'{"model": "\xff"}', "not valid JSON"), (b'{"model": "\\ud800"}', "lone UTF-16 surrogate")):
        response = post(server, "/v1/unload_lora_adapter", content=body)  # found by tests/resilience/test_fuzz_http
        assert (response.status_code, says in error_of(response)["message"]) == (400, True), response.text
    huge = _chat_body(messages=[{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}])
    response = post(server, "/v1/chat/completions", json=huge)
    assert (response.status_code, error_of(response)["code"]) == (413, "request_too_large")
    chunked = post(server, "/v1/completions", content=iter([b'{"prompt": "', b"y" * MAX_BODY_BYTES, b'"}']))
    assert (chunked.status_code, error_of(chunked)["code"]) == (413, "request_too_large")


def test_the_sdk_raises_its_typed_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        chat(oai, "no-such-adapter")
    assert missing.value.status_code == 404 and "no-such-adapter" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        chat(oai, "alpha", n=3)
    assert bad.value.param == "n"


def _cancelled(server: ServerProcess) -> float:
    """Requests that ended cancelled, whatever their labels (the adapter label is bounded)."""
    lines = [line for line in scrape(server).splitlines() if line.startswith("loraplex_requests_total{")]
    return sum(float(line.split()[-1]) for line in lines if 'status="cancelled"' in line)


def _wait_cancelled(server: ServerProcess, grpc_client: Client, before: float) -> None:
    """Within a bounded wait: no stream or sequence is left, and one more request ended cancelled."""
    started = time.monotonic()
    while (status := grpc_client.status()).active_streams + status.running_requests > 0:
        assert time.monotonic() - started < 10, status
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while _cancelled(server) != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_its_request(server: ServerProcess, grpc_client: Client) -> None:
    before = _cancelled(server)
    body = {"model": "gamma", "messages": CHAT, "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.http_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines).startswith("data: {") for _ in range(3)] == [True, False, True]
    _wait_cancelled(server, grpc_client, before)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_disconnects_before_a_whole_answer_frees_its_request(
    server: ServerProcess, grpc_client: Client, path: str
) -> None:
    before = _cancelled(server)
    prompt = {"messages": CHAT} if path.endswith("chat/completions") else {"prompt": PROMPT}
    body = json.dumps({"model": "gamma", **prompt, "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as client:
        client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while grpc_client.status().running_requests == 0:  # decoding its MAX_NEW_TOKENS tokens
            assert time.monotonic() < deadline
            time.sleep(0.02)
    _wait_cancelled(server, grpc_client, before)
    assert chat(openai_client(server), "alpha").choices[0].finish_reason == "length"  # still serving others


def test_draining_answers_503_while_accepted_streams_finish(server: ServerProcess) -> None:
    """Stops the server: keep it the module's last test."""
    streamed: list[str] = []
    first = threading.Event()

    def read() -> None:
        body = {"model": "alpha", "messages": CHAT, "max_tokens": 48, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.http_url}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                streamed.append(line)
                first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(60)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while get(server, "/ready").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert get(server, "/ready").json() == {"ready": False, "phase": "draining"}
    refused = post(server, "/v1/chat/completions", json=_chat_body())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert error_of(refused)["type"] == "service_unavailable_error" and "draining" in error_of(refused)["message"]
    reader.join(120)
    assert streamed[-2:] == ["data: [DONE]", ""] or streamed[-1] == "data: [DONE]", streamed[-3:]
    assert any('"finish_reason":"length"' in line for line in streamed)
    assert server.process.wait(60) == 0
