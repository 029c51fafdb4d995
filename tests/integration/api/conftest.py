"""The shared real server for API tests: one process for the session, on a free loopback port, with the embedded
base model and 20 synthetic adapters (plus two the server must reject), and helpers to reach it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoConfig

from loraplex.proto.v1 import generation_pb2_grpc
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.api.helpers import ADAPTERS, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_RANK
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess

SERVER_FLAGS = (
    f"--adapters.max-rank={MAX_RANK}",
    f"--engine.max-prompt-tokens={MAX_PROMPT_TOKENS}",
    f"--engine.max-new-tokens={MAX_NEW_TOKENS}",
    "--engine.kv-cache-tokens=16384",
    "--engine.max-seq-len=4096",
    "--engine.max-queue=256",  # test_concurrency sends 200 requests at once: a deep queue absorbs the burst
    f"--server.max-prompt-chars={MAX_PROMPT_CHARS}",
    "--server.default-max-new-tokens=8",
)


@pytest.fixture(scope="session")
def base_shape(base_dir: str) -> ModelShape:
    return ModelShape.from_config(AutoConfig.from_pretrained(base_dir))


def write_adapters(root: Path, shape: ModelShape) -> Path:
    """20 rank-8 adapters whose outputs differ from each other, one over the rank limit, one with corrupt weights."""
    for index, adapter_id in enumerate(ADAPTERS):
        write_adapter(root / adapter_id, shape, rank=8, seed=100 + index, strength=2.0 + 0.2 * index)
    write_adapter(root / "too-big", shape, rank=2 * MAX_RANK, layers=[0], seed=7)
    broken = write_adapter(root / "broken", shape, rank=8, layers=[0], seed=8)
    (broken / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    assert json.loads((broken / CONFIG_FILE).read_text())["r"] == 8
    return root


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Path:
    return write_adapters(tmp_path_factory.mktemp("adapters"), base_shape)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess.start(log, [adapter_root], *SERVER_FLAGS) as process:
        yield process
        assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(scope="session")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as open_channel:
        yield open_channel


@pytest.fixture(scope="session")
def generation(channel: grpc.Channel) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(channel)
