"""A real server for the A/B routing tests: synthetic adapters, a routes file with one route, bearer-token tenants,
and small drift settings; plus helpers to call it as each tenant and to read its /metrics."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from loraplex.server.core.shape import ModelShape
from tests.integration.api.conftest import base_shape  # noqa: F401  (the shared fixture)
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess

ADMIN = "routing-admin-token-0123456789"
TEAM_A = "routing-team-a-token-abcdefghij"
TEAM_B = "routing-team-b-token-klmnopqrst"
TOKENS = {
    ADMIN: {"tenant": "ops", "adapters": ["*"], "routes": ["*"], "admin": True},
    TEAM_A: {"tenant": "team-a", "adapters": ["ab-*", "base"], "routes": ["team-a-*"]},
    TEAM_B: {"tenant": "team-b", "adapters": ["base"], "routes": ["team-b-*"]},
}
ADAPTERS = ("ab-v1", "ab-v2", "ab-shadow", "ab-extra")
ROUTE = "team-a-bot"
ROUTES_FILE = {
    "routes": {
        ROUTE: {
            "variants": [
                {"name": "v1", "adapter": "ab-v1", "weight": 50},
                {"name": "v2", "adapter": "ab-v2", "weight": 50},
            ],
            "shadow": {"adapter": "ab-shadow", "percent": 100},
        }
    }
}
FLAGS = (
    "--server.default-max-new-tokens=4",
    "--observability.drift-reference-size=10",
    "--observability.drift-min-samples=5",
    "--observability.drift-window=50",
)
_METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def metrics_port(server: ServerProcess) -> int:
    return int(server.wait_for_log(_METRICS).group(1))


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(server)}/metrics", timeout=30) as response:
        text: str = response.read().decode()
    return text


def start(directory: Path, adapter_root: Path, routes_file: Path) -> ServerProcess:
    tokens = directory / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(TOKENS))
    flags = (f"--routes-file={routes_file}", f"--auth.tokens-file={tokens}", *FLAGS)
    return ServerProcess.start(directory / "server.log", [adapter_root], *flags)


@pytest.fixture(scope="package")
def routing_root(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("routing-adapters")
    for index, adapter_id in enumerate(ADAPTERS):
        write_adapter(root / adapter_id, base_shape, rank=8, seed=300 + index, strength=2.0 + 0.5 * index)
    return root


@pytest.fixture(scope="package")
def routes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routes") / "routes.yaml"
    path.write_text(yaml.safe_dump(ROUTES_FILE))
    return path


@pytest.fixture(scope="package")
def routing_server(
    tmp_path_factory: pytest.TempPathFactory, routing_root: Path, routes_file: Path
) -> Iterator[ServerProcess]:
    with start(tmp_path_factory.mktemp("routing-server"), routing_root, routes_file) as process:
        yield process
        assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(scope="package")
def channel(routing_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(routing_server.target) as opened:
        yield opened
