"""Bearer tokens and tenants over HTTP, on a server with auth on: the same tokens file and scopes as gRPC. A token
for tenant A cannot list, use, load or unload tenant B's adapters; admin endpoints need the admin scope; health
needs no token; and a full engine queue answers 429 with Retry-After at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraplex.client import Client
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.http.conftest import CHAT, error_of, get, openai_client, post, start_server
from tests.integration.routing.conftest import scrape
from tests.support.server_process import ServerProcess

ADMIN = "ops-token-5b0c1d2e3f4a5b6c7d8e"
TEAM_A = "team-a-token-0f1e2d3c4b5a6978"  # admin over its own adapters only
TEAM_B = "team-b-token-99aa88bb77cc66dd"  # no admin scope
TOKENS = {
    ADMIN: {"tenant": "ops", "adapters": ["*"], "routes": ["*"], "admin": True},
    TEAM_A: {"tenant": "team-a", "adapters": ["team-a/*", "base"], "admin": True},
    TEAM_B: {"tenant": "team-b", "adapters": ["team-b/*"]},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http_adapter_root: Path) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("http-auth")
    tokens = directory / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(TOKENS))
    flags = (f"--auth.tokens-file={tokens}", "--engine.max-running=1", "--engine.max-queue=1")
    with start_server(directory, http_adapter_root, *flags) as process:
        yield process
        assert process.stop() == 0, process.log()[-3000:]
        assert all(token not in process.log() for token in TOKENS)


def chat(server: ServerProcess, token: str, model: str) -> str:
    client = openai_client(server, token)
    answer = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=4)
    return answer.choices[0].message.content or ""


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "missing bearer token"),
        ({"authorization": "Bearer not-a-known-token-at-all"}, "invalid bearer token"),
        ({"authorization": f"Basic {TEAM_A}"}, "malformed authorization"),
    ],
)
def test_requests_without_a_valid_token_are_401(server: ServerProcess, headers: dict[str, str], says: str) -> None:
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/load_lora_adapter")):
        body = {"model": "base", "messages": CHAT} if path.endswith("completions") else {"lora_name": "team-a/one"}
        if method == "POST":
            response = post(server, path, json=body, headers=headers)
        else:
            response = get(server, path, headers=headers)
        error = error_of(response)
        assert (response.status_code, error["type"]) == (401, "authentication_error"), (path, error)
        assert error["message"].startswith(says)


def test_the_sdk_sees_a_bad_key_as_an_authentication_error(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(server, "wrong-token-of-some-length", "base")
    assert refused.value.status_code == 401


def test_each_tenant_lists_only_what_it_may_use(server: ServerProcess) -> None:
    listed = {
        token: sorted(m.id for m in openai_client(server, token).models.list().data) for token in (TEAM_A, TEAM_B)
    }
    assert listed == {TEAM_A: ["base", "team-a/one"], TEAM_B: ["team-b/one", "team-b/spare"]}
    everything = {m.id for m in openai_client(server, ADMIN).models.list().data}
    assert {"base", "alpha", "team-a/one", "team-b/one", "team-b/spare"} <= everything


def test_a_tenant_uses_its_own_adapters_and_not_another_tenants(server: ServerProcess) -> None:
    assert chat(server, TEAM_A, "team-a/one") == chat(server, ADMIN, "team-a/one")
    assert chat(server, TEAM_B, "team-b/one") == chat(server, ADMIN, "team-b/one")
    for token, model in ((TEAM_A, "team-b/one"), (TEAM_B, "team-a/one"), (TEAM_B, "base"), (TEAM_A, "alpha")):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            chat(server, token, model)
        assert refused.value.status_code == 403 and model in refused.value.message


def test_load_and_unload_need_the_admin_scope_and_the_adapters_tenant(server: ServerProcess) -> None:
    cases = [
        (TEAM_A, "/v1/load_lora_adapter", "team-b/spare", "may not use adapter"),  # admin, but not team-b's
        (TEAM_A, "/v1/unload_lora_adapter", "team-b/one", "may not use adapter"),
        (TEAM_B, "/v1/load_lora_adapter", "team-b/spare", "may not call the admin"),  # its own, but no admin scope
        (TEAM_B, "/v1/unload_lora_adapter", "team-b/one", "may not call the admin"),
    ]
    for token, path, adapter, says in cases:
        response = post(server, path, token, json={"lora_name": adapter})
        error = error_of(response)
        assert (response.status_code, error["type"]) == (403, "permission_error"), (path, adapter, error)
        assert says in error["message"]
    loaded = post(server, "/v1/load_lora_adapter", TEAM_A, json={"lora_name": "team-a/one", "pin": True})
    assert loaded.status_code == 200 and loaded.json()["pinned"] is True
    assert post(server, "/v1/unload_lora_adapter", TEAM_A, json={"lora_name": "team-a/one"}).status_code == 200
    assert post(server, "/v1/load_lora_adapter", TEAM_A, json={"lora_name": "team-a/one"}).status_code == 200


def test_health_and_readiness_need_no_token(server: ServerProcess) -> None:
    assert get(server, "/health").status_code == 200 and get(server, "/ready").json()["ready"] is True


def test_a_full_engine_queue_answers_429_with_retry_after_at_once(server: ServerProcess) -> None:
    metadata = (("authorization", f"Bearer {ADMIN}"),)
    long = generation_pb2.GenerateRequest(
        prompt="Count to one hundred.",
        adapter_id="team-a/one",
        sampling=generation_pb2.SamplingParameters(max_new_tokens=48, ignore_eos=True),
    )
    with grpc.insecure_channel(server.target) as channel, Client(server.target, token=ADMIN) as client:
        stub = generation_pb2_grpc.GenerationStub(channel)
        running = stub.GenerateStream(long, metadata=metadata)
        next(running)  # the only running slot (engine.max_running=1)
        waiting = stub.GenerateStream(long, metadata=metadata)
        deadline = time.monotonic() + 30
        while client.status().waiting_requests < 1:  # the only queue place (engine.max_queue=1)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        body = {"model": "team-a/one", "messages": CHAT, "max_tokens": 4}
        refused = post(server, "/v1/chat/completions", ADMIN, json=body)
        elapsed = time.monotonic() - started
        running.cancel()
        waiting.cancel()
    error = error_of(refused)
    assert (refused.status_code, error["type"], refused.headers["retry-after"]) == (429, "rate_limit_error", "1")
    assert elapsed < 2.0 and "retry" in error["message"]


LONG_CHAT = [
    {"role": "system", "content": "You answer questions about the sea in one short sentence, plainly, with no lists."},
    {"role": "user", "content": "Why is the sea salty, and why are rivers not?"},
]


def prefix_hit_tokens(server: ServerProcess) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(scrape(server))
        for sample in family.samples
        if sample.name == "loraplex_prefix_cache_hit_tokens_total"
    )


def test_the_prefix_cache_keeps_tenants_and_cache_salts_apart(server: ServerProcess) -> None:
    """The API layer names each request's cache namespace: its tenant (from the token) and its cache_salt (the
    HTTP body field, the gRPC GenerateRequest field); the engine reuses blocks only within one namespace."""

    def hit_tokens(token: str, salt: str | None = None, over_grpc: bool = False) -> float:
        before = prefix_hit_tokens(server)
        if over_grpc:
            with grpc.insecure_channel(server.target) as channel:
                generation_pb2_grpc.GenerationStub(channel).Generate(
                    generation_pb2.GenerateRequest(
                        messages=[generation_pb2.ChatMessage(**turn) for turn in LONG_CHAT],
                        cache_salt=salt or "",
                        sampling=generation_pb2.SamplingParameters(max_new_tokens=2),
                    ),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
        else:
            body = {"model": "base", "messages": LONG_CHAT, "max_tokens": 2, "temperature": 0}
            response = post(server, "/v1/chat/completions", token, json=body | ({"cache_salt": salt} if salt else {}))
            assert response.status_code == 200, response.text
        return prefix_hit_tokens(server) - before

    with Client(server.target, token=ADMIN) as client:  # the queue test's cancelled requests leave first
        deadline = time.monotonic() + 30
        while (status := client.status()).running_requests + status.waiting_requests:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert hit_tokens(TEAM_A) == 0
    assert hit_tokens(TEAM_A) >= 16  # the same tenant's prompt again: its full blocks are reused
    assert hit_tokens(ADMIN) == 0  # another tenant, the same prompt: nothing shared
    assert hit_tokens(TEAM_A, salt="s1") == 0  # a salt is a namespace of its own
    assert hit_tokens(TEAM_A, salt="s1", over_grpc=True) >= 16  # the gRPC field names the same namespace
    assert hit_tokens(TEAM_A, salt="s2", over_grpc=True) == 0
