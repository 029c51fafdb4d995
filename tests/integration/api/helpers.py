"""Constants of the shared API test server and small helpers to build requests and read its state."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from loraplex.proto.v1 import generation_pb2, server_pb2, server_pb2_grpc
from tests.support.server_process import ServerProcess

ADAPTERS = tuple(f"t{i:02d}" for i in range(20))
PROMPT = "Write a short poem about the sea."
MAX_RANK = 16
# Limits of the shared server, small enough for tests to cross them cheaply.
MAX_PROMPT_TOKENS = 2048
MAX_PROMPT_CHARS = 50_000
MAX_NEW_TOKENS = 64
STOCK_CLIENT = Path(__file__).with_name("stock_oip_client.py")
STOCK_ADAPTER = ADAPTERS[5]  # what the stock client infers with
STOCK_EXTRA = "oip-stock-extra"  # what it loads and unloads


def running_requests(channel: grpc.Channel) -> int:
    return server_pb2_grpc.ServerStub(channel).GetStatus(server_pb2.GetStatusRequest()).running_requests


def wait_until_idle(channel: grpc.Channel, timeout: float = 30.0) -> int:
    """Polls GetStatus until no sequence runs or waits; returns the last running count seen (0 when idle)."""
    stub = server_pb2_grpc.ServerStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        status = stub.GetStatus(server_pb2.GetStatusRequest())
        busy = status.running_requests + status.waiting_requests + status.active_streams
        if busy == 0 or time.monotonic() > deadline:
            return busy
        time.sleep(0.05)


def request(prompt: str = PROMPT, adapter_id: str = "", **sampling: Any) -> generation_pb2.GenerateRequest:
    """A GenerateRequest; sampling keywords as in SamplingParameters (max_new_tokens defaults to 8)."""
    sampling.setdefault("max_new_tokens", 8)
    return generation_pb2.GenerateRequest(
        prompt=prompt, adapter_id=adapter_id, sampling=generation_pb2.SamplingParameters(**sampling)
    )


def run_stock_client(target: str, *flags: str) -> dict[str, Any]:
    """Runs stock_oip_client.py (tritonclient, in its own process) and returns its JSON report."""
    done = subprocess.run(
        [sys.executable, str(STOCK_CLIENT), target, "--adapter", STOCK_ADAPTER, "--extra-adapter", STOCK_EXTRA, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def cli(server: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the ``loraplex`` CLI against ``server``."""
    return subprocess.run(
        [sys.executable, "-m", "loraplex.client.cli", "--target", server.target, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
