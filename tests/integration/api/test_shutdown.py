"""The server's life on servers of their own: NOT_SERVING while the base model loads, then SERVING; SIGTERM under
load drains (health NOT_SERVING, new calls UNAVAILABLE) and loses no accepted request; the grace period bounds the
drain; the process exits 0."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc, server_pb2, server_pb2_grpc
from tests.integration.api.helpers import ADAPTERS, request
from tests.support.server_process import ServerProcess

STREAMS = 12
NEW_TOKENS = 24
SERVING = re.compile(r"loraplex\.server: serving")


@pytest.fixture(scope="module")
def starting_server(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("lifecycle") / "server.log"
    flags = ("--engine.max-running=4", "--engine.max-queue=16", "--server.grace-period-s=120")  # all 12 accepted
    with ServerProcess.start(log, [adapter_root], *flags, wait="listening") as process:
        yield process


def health_of(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status


def test_not_serving_while_the_base_model_loads(starting_server: ServerProcess) -> None:
    with grpc.insecure_channel(starting_server.target) as channel:
        assert health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as raised:
            generation_pb2_grpc.GenerationStub(channel).Generate(request())
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in raised.value.details()
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        assert inference.ServerLive(oip.ServerLiveRequest()).live
        assert not inference.ServerReady(oip.ServerReadyRequest()).ready
        starting_server.wait_for_log(SERVING)
        assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING
        assert inference.ServerReady(oip.ServerReadyRequest()).ready


def test_sigterm_under_load_finishes_every_accepted_request_and_exits_0(starting_server: ServerProcess) -> None:
    starting_server.wait_for_log(SERVING)
    channel = grpc.insecure_channel(starting_server.target)
    stub = generation_pb2_grpc.GenerationStub(channel)
    outcomes: dict[str, list[generation_pb2.GenerateStreamResponse] | grpc.RpcError] = {}

    def stream(adapter_id: str) -> None:
        try:
            outcomes[adapter_id] = list(
                stub.GenerateStream(request(adapter_id=adapter_id, max_new_tokens=NEW_TOKENS, ignore_eos=True))
            )
        except grpc.RpcError as error:
            outcomes[adapter_id] = error

    threads = [threading.Thread(target=stream, args=(a,)) for a in ADAPTERS[:STREAMS]]
    for thread in threads:
        thread.start()
    status = server_pb2_grpc.ServerStub(channel).GetStatus
    deadline = time.monotonic() + 60
    while status(server_pb2.GetStatusRequest()).active_streams < STREAMS and time.monotonic() < deadline:
        time.sleep(0.02)
    accepted = status(server_pb2.GetStatusRequest())
    assert accepted.waiting_requests > 0  # some are queued behind engine.max_running=4 when the signal comes
    starting_server.process.terminate()  # SIGTERM

    deadline = time.monotonic() + 10
    while health_of(channel) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(request(max_new_tokens=1))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in raised.value.details()

    for thread in threads:
        thread.join(120)
    for adapter_id, outcome in outcomes.items():
        assert not isinstance(outcome, grpc.RpcError), f"{adapter_id}: {outcome}"
        assert outcome[-1].usage.completion_tokens == NEW_TOKENS
        assert sum(len(m.token_ids) for m in outcome) == NEW_TOKENS
    assert len(outcomes) == STREAMS
    assert starting_server.process.wait(60) == 0
    log = starting_server.log()
    assert "draining" in log and "stopped" in log and "Traceback" not in log
    channel.close()


def test_the_grace_period_bounds_the_drain(tmp_path: Path, adapter_root: Path) -> None:
    with ServerProcess.start(tmp_path / "server.log", [adapter_root], "--server.grace-period-s=1") as server:
        channel = grpc.insecure_channel(server.target)
        long = generation_pb2_grpc.GenerationStub(channel).GenerateStream(request(max_new_tokens=1000, ignore_eos=True))
        next(long)
        started = time.monotonic()
        server.process.terminate()
        with pytest.raises(grpc.RpcError) as raised:
            list(long)
        assert raised.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert server.process.wait(60) == 0
        assert time.monotonic() - started < 10
        assert "1 requests still running after the grace period" in server.log()
        channel.close()
