"""The real server for the HTTP API tests, with a few synthetic PEFT adapters, and helpers to reach it over HTTP
(the official ``openai`` SDK, and httpx for what the SDK cannot send) and over gRPC (the project's client)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoConfig

from loraplex.server.core.shape import ModelShape
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess

# Adapters whose greedy answers differ from each other's and from the base's (strong synthetic deltas).
ADAPTERS = ("alpha", "beta", "gamma", "team-a/one", "team-b/one", "team-b/spare")
CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]
PROMPT = "The capital of France is"
MAX_NEW_TOKENS = 128
MAX_BODY_BYTES = 64 * 1024  # server.max_message_bytes: a bigger body is 413


@pytest.fixture(scope="session")
def http_adapter_root(tmp_path_factory: pytest.TempPathFactory, base_dir: str) -> Path:
    shape = ModelShape.from_config(AutoConfig.from_pretrained(base_dir))
    root = tmp_path_factory.mktemp("http-adapters")
    for index, adapter_id in enumerate(ADAPTERS):
        write_adapter(root / adapter_id, shape, rank=8, seed=300 + index, strength=2.0 + 0.3 * index)
    return root


def start_server(directory: Path, root: Path, *flags: str) -> ServerProcess:
    common = (
        f"--engine.max-new-tokens={MAX_NEW_TOKENS}",
        f"--server.max-message-bytes={MAX_BODY_BYTES}",
        "--server.default-max-new-tokens=8",
    )
    server = ServerProcess.start(directory / "server.log", [root], *common, *flags)
    assert server.http_port > 0, server.log()[-2000:]
    return server


def openai_client(server: ServerProcess, token: str = "unused") -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test as it was answered.
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=token, max_retries=0, timeout=120)


def async_openai_client(server: ServerProcess, token: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=token, max_retries=0, timeout=120)


def _headers(token: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    return {**({"authorization": f"Bearer {token}"} if token else {}), **(headers or {})}


def post(
    server: ServerProcess, path: str, token: str | None = None, headers: dict[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", headers=_headers(token, headers), timeout=120, **kwargs)


def get(
    server: ServerProcess, path: str, token: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.get(f"{server.http_url}{path}", headers=_headers(token, headers), timeout=60)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a failed response (asserting its shape)."""
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error
