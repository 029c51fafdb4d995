"""Slow readers on a real server: a client that sends a streaming request and never reads its answer, over HTTP
(SSE, a raw socket with a tiny receive window) and over gRPC (a server stream whose iterator is never consumed, on a
channel with a small HTTP/2 window), is dropped after ``server.stream_write_timeout_s``: its request is counted as
cancelled, its stream slot and engine slot are free again, and the server answers others meanwhile and after."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.client import Client
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.routing.conftest import scrape
from tests.support.server_process import ServerProcess, stopping_cleanly

WRITE_TIMEOUT_S = 1.0
MAX_NEW_TOKENS = 1000  # far more than the stalled client's buffers hold; the timeout ends it, not the length
ADAPTER = "t03"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Iterator[ServerProcess]:
    flags = (
        f"--server.stream-write-timeout-s={WRITE_TIMEOUT_S}",
        f"--engine.max-new-tokens={MAX_NEW_TOKENS}",
        "--engine.kv-cache-tokens=8192",
        "--engine.max-seq-len=2048",
    )
    log = tmp_path_factory.mktemp("slow-readers") / "server.log"
    with stopping_cleanly(ServerProcess.start(log, [adapter_root], *flags)) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target) as opened:
        yield opened


def cancelled(server: ServerProcess) -> float:
    """Requests that ended cancelled, whatever their labels."""
    total = 0.0
    for family in text_string_to_metric_families(scrape(server)):
        if family.name == "loraplex_requests":
            total += sum(
                s.value for s in family.samples if s.name.endswith("_total") and s.labels["status"] == "cancelled"
            )
    return total


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition`` held (polling); fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.05)
    return time.monotonic() - started


def busy(client: Client) -> bool:
    status = client.status()
    return status.active_streams + status.running_requests + status.waiting_requests > 0


def assert_stalled_then_freed(server: ServerProcess, client: Client, before: float) -> float:
    """Waits for the stalled request to start, then for the server to drop it; the seconds it was held."""
    wait_until(lambda: client.status().running_requests == 1, 30, "the stalled request never ran")
    started = time.monotonic()
    # Meanwhile the server answers others.
    assert client.generate("The capital of France is", max_new_tokens=4).usage.completion_tokens == 4
    wait_until(lambda: not busy(client), 120, f"the stalled request still holds the server: {client.status()}")
    held = time.monotonic() - started
    wait_until(lambda: cancelled(server) == before + 1, 10, "the stalled request was not counted as cancelled")
    return held


def raw_client(port: int) -> socket.socket:
    """A TCP client with the smallest receive window Linux allows (and a tiny MSS), so the server's writes stall
    after a few tens of KiB the client never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    sock.connect(("127.0.0.1", port))
    return sock


def test_an_sse_client_that_never_reads_is_dropped_after_the_write_timeout(
    server: ServerProcess, client: Client
) -> None:
    before = cancelled(server)
    body = json.dumps(
        {
            "model": ADAPTER,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": MAX_NEW_TOKENS,
            "ignore_eos": True,
            "logprobs": True,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with raw_client(server.http_port) as sock:
        sock.sendall(head + body)
        held = assert_stalled_then_freed(server, client, before)
        assert WRITE_TIMEOUT_S <= held < 120, held
        # The connection was dropped: what the kernel buffered reads out, then the stream ends without [DONE].
        sock.settimeout(10)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 200") and b"data: {" in received
    assert b"data: [DONE]" not in received
    assert "stream_write_timeout_s" in server.log()


def test_a_grpc_stream_whose_iterator_is_never_consumed_is_cancelled_after_the_write_timeout(
    server: ServerProcess, client: Client
) -> None:
    before = cancelled(server)
    options = [
        ("grpc.http2.bdp_probe", 0),  # no window growth: the window stays at the look-ahead below
        ("grpc.http2.lookahead_bytes", 1024),
        ("grpc.use_local_subchannel_pool", 1),  # a connection of its own
    ]
    with grpc.insecure_channel(server.target, options=options) as channel:
        request = generation_pb2.GenerateRequest(
            adapter_id=ADAPTER,
            prompt="Once upon a time",
            sampling=generation_pb2.SamplingParameters(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True),
        )
        call = generation_pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=120)
        held = assert_stalled_then_freed(server, client, before)
        assert WRITE_TIMEOUT_S <= held < 120, held
        # Reading at last: the messages written before the stall, then the status that says why the stream ended.
        messages = 0
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:
                messages += 1
    assert 0 < messages < MAX_NEW_TOKENS
    assert ended.value.code() == grpc.StatusCode.CANCELLED, ended.value
    assert "stream_write_timeout_s" in (ended.value.details() or "")
