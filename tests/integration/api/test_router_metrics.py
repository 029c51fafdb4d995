"""The metrics a LoRA-aware router (the Gateway API Inference Extension's endpoint picker) reads, scraped from a
real server while requests on two adapters run and one on a third waits: ``loraplex_waiting_requests``,
``loraplex_kv_cache_usage_ratio``, ``loraplex_lora_requests_info`` (vLLM's ``vllm:lora_requests_info`` shape) and
per-adapter residency, bounded by ``observability.max_adapter_labels``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.client import Client
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.routing.conftest import scrape
from tests.support.server_process import ServerProcess, stopping_cleanly

DEVICE_SLOTS = 6
MAX_ADAPTER_LABELS = 3
MAX_NEW_TOKENS = 400  # long enough to scrape while they run; the test cancels them


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Iterator[ServerProcess]:
    flags = (
        "--engine.max-running=2",
        f"--engine.max-new-tokens={MAX_NEW_TOKENS}",
        "--engine.kv-cache-tokens=4096",
        "--engine.max-seq-len=1024",
        f"--adapters.device-slots={DEVICE_SLOTS}",
        f"--observability.max-adapter-labels={MAX_ADAPTER_LABELS}",
    )
    log = tmp_path_factory.mktemp("router-metrics") / "server.log"
    with stopping_cleanly(ServerProcess.start(log, [adapter_root], *flags)) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target) as opened:
        yield opened


def metrics(server: ServerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(scrape(server))}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.05)


class Streams:
    """Server streams read to the end on threads; :meth:`cancel_all` ends them."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = generation_pb2_grpc.GenerationStub(channel)
        self._calls: list[Any] = []
        self._threads: list[threading.Thread] = []

    def start(self, adapter_id: str) -> None:
        sampling = generation_pb2.SamplingParameters(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
        request = generation_pb2.GenerateRequest(adapter_id=adapter_id, prompt="Once upon a time", sampling=sampling)
        call = self._stub.GenerateStream(request, timeout=300)

        def read() -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        self._calls.append(call)
        self._threads.append(thread)

    def cancel_all(self) -> None:
        for call in self._calls:
            call.cancel()
        for thread in self._threads:
            thread.join(30)


def test_router_metrics_while_two_adapters_run_and_a_third_waits(server: ServerProcess, client: Client) -> None:
    client.load_adapter("t05", pin=True)
    with grpc.insecure_channel(server.target) as channel:
        streams = Streams(channel)
        try:
            streams.start("t01")
            streams.start("t02")
            wait_until(lambda: client.status().running_requests == 2, 60, "two requests never ran")
            streams.start("t03")
            wait_until(lambda: client.status().waiting_requests == 1, 60, "the third request never waited")
            before = time.time()
            scraped = metrics(server)
            status = client.status()
        finally:
            streams.cancel_all()
    assert status.running_requests == 2 and status.waiting_requests == 1, status  # still so after the scrape
    assert scraped["loraplex_waiting_requests"] == [({}, 1.0)]
    assert scraped["loraplex_running_requests"] == [({}, 2.0)]
    [(_, kv_usage)] = scraped["loraplex_kv_cache_usage_ratio"]
    assert 0 < kv_usage < 1
    [(labels, stamp)] = scraped["loraplex_lora_requests_info"]
    assert labels == {
        "running_lora_adapters": "t01,t02",
        "waiting_lora_adapters": "t03",
        "max_lora": str(DEVICE_SLOTS),
    }
    assert before - 60 < stamp <= time.time()
    residency = [(s["adapter"], s["tier"], s["pinned"], s["rank"]) for s, _ in scraped["loraplex_adapter_residency"]]
    assert len(residency) == MAX_ADAPTER_LABELS  # four adapters are in memory (t03 may still be loading)
    assert residency[0] == ("t05", "device", "true", "8")  # pinned first
    assert {("t01", "device", "false", "8"), ("t02", "device", "false", "8")} <= set(residency)


def test_lora_requests_info_is_empty_once_idle(server: ServerProcess, client: Client) -> None:
    wait_until(lambda: client.status().running_requests + client.status().waiting_requests == 0, 60, "requests left")
    [(labels, _)] = metrics(server)["loraplex_lora_requests_info"]
    assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": str(DEVICE_SLOTS)}
