"""Resilience scenario 5, faults, each made real against the real server process: the adapter root stops being a
readable directory, the disk fills while routes are persisted, a client opens 1,000 streams and never reads them,
and a deadline expires mid-generation.

Tests run as root, so ``chmod`` would not stop the server reading: the adapter root is instead moved away and a
plain file put in its place (what a failed mount or a bad deploy leaves). The disk is a 64 KiB tmpfs mounted as the
routes file's directory (skipped when the test cannot mount). The slow consumer uses its own channel, so the other
clients' connection is a different HTTP/2 connection, as for a real second client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from loraplex.client import Client
from loraplex.client.errors import FailedPreconditionError, LoraplexError, NotFoundError
from loraplex.client.retry import NO_RETRIES
from loraplex.client.types import Route, ServerStatus, Variant
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc
from loraplex.server.config import MIB
from loraplex.server.core.shape import ModelShape
from tests.support.adapters import write_adapter
from tests.support.resilience import full_run, record, rss_bytes
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.resilience

SLOW_STREAMS = 1000
PROMPT = "Write a short poem about the sea."


@dataclass
class FaultServer:
    server: ServerProcess
    root: Path  # the adapter root the server was started with
    routes_dir: Path  # a mounted 64 KiB tmpfs


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Iterator[FaultServer]:
    shape = base_shape
    root = tmp_path_factory.mktemp("fault-adapters") / "root"
    for index, adapter in enumerate(("cached", "on-disk")):
        write_adapter(root / adapter, shape, rank=4, layers=[0], seed=index, strength=2.0)
    routes_dir = tmp_path_factory.mktemp("fault-routes")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(routes_dir)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full fault needs a real small file system")
    log = tmp_path_factory.mktemp("fault-server") / "server.log"
    try:
        flags = (f"--routes-file={routes_dir / 'routes.yaml'}", "--engine.max-running=8")
        with ServerProcess.start(log, [root], *flags) as server:
            yield FaultServer(server, root, routes_dir)
            assert server.stop() == 0, server.log()[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(routes_dir)], check=False)


def test_an_adapter_root_that_is_no_longer_a_directory(fault_server: FaultServer) -> None:
    root = fault_server.root
    away = root.with_name("root.away")
    with Client(fault_server.server.target, retry=NO_RETRIES, timeout=120) as client:
        cached = client.generate(PROMPT, adapter="cached", max_new_tokens=4, ignore_eos=True).token_ids
        root.rename(away)
        root.write_text("not a directory: the volume failed to mount")
        try:
            with pytest.raises(LoraplexError) as raised:
                client.generate(PROMPT, adapter="on-disk", max_new_tokens=4)
            code, message = raised.value.code, raised.value.message
            again = client.generate(PROMPT, adapter="cached", max_new_tokens=4, ignore_eos=True).token_ids
            base = client.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        finally:
            root.unlink()
            away.rename(root)
        restored = client.generate(PROMPT, adapter="on-disk", max_new_tokens=4, ignore_eos=True)
    record(5, "adapter root replaced by a file", f"{code.name}: {message[:80]}", "clear error, keeps serving", True)
    assert isinstance(raised.value, NotFoundError | FailedPreconditionError), (code, message)
    assert "on-disk" in message
    assert again == cached and base.usage.completion_tokens == 4  # in-memory adapters and the base keep serving
    assert restored.usage.completion_tokens == 4 and restored.served_by.adapter_id == "on-disk"


def test_disk_full_while_persisting_routes_fails_cleanly(fault_server: FaultServer) -> None:
    routes_file = fault_server.routes_dir / "routes.yaml"
    filler = fault_server.routes_dir / "filler"
    first = Route("checkout", (Variant("a", "cached", 50.0), Variant("b", "base", 50.0)))
    second = Route("search", (Variant("a", "cached", 100.0),))
    with Client(fault_server.server.target, retry=NO_RETRIES, timeout=60) as client:
        client.set_route(first)
        before = routes_file.read_bytes()
        with contextlib.suppress(OSError), filler.open("wb") as out:  # ENOSPC ends the loop
            while True:
                out.write(b"\0" * 4096)
                out.flush()
                os.fsync(out.fileno())
        try:
            with pytest.raises(FailedPreconditionError) as raised:
                client.set_route(second)
            names = [route.name for route in client.list_routes()]
            served = client.generate(PROMPT, route="checkout", user_key="u1", max_new_tokens=2)
        finally:
            filler.unlink()
        after_full = routes_file.read_bytes()
        client.set_route(second)  # space again: the change goes through
        names_later = [route.name for route in client.list_routes()]
    leftovers = sorted(p.name for p in fault_server.routes_dir.iterdir() if p.name != "routes.yaml")
    record(5, "SetRoute on a full disk", f"FAILED_PRECONDITION: {raised.value.message[:80]}", "clean failure", True)
    record(5, "routes file after the failed write", "unchanged" if after_full == before else "CHANGED", "intact", True)
    assert "No space left on device" in raised.value.message and "nothing was changed" in raised.value.message
    assert after_full == before and names == ["checkout"] and served.served_by.route == "checkout"
    assert leftovers == [], f"temporary files left on the full disk: {leftovers}"
    assert names_later == ["checkout", "search"] and b"search" in routes_file.read_bytes()


async def never_read(channel: grpc.aio.Channel, count: int, new_tokens: int) -> list[object]:
    """Opens ``count`` GenerateStream calls on ``channel`` and reads none of them."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT, sampling=generation_pb2.SamplingParameters(max_new_tokens=new_tokens, ignore_eos=True)
    )
    calls: list[object] = [stub.GenerateStream(request) for _ in range(count)]
    await asyncio.sleep(0.5)  # the calls start
    return calls


def wait_idle(client: Client, timeout: float = 120.0) -> ServerStatus:
    deadline = time.monotonic() + timeout
    while (status := client.status()).running_requests + status.waiting_requests and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def test_a_thousand_unread_streams_hold_no_engine_slot_and_are_freed(fault_server: FaultServer) -> None:
    """The unread streams' requests are admitted up to engine.max_running + max_queue (the rest refused at once),
    generate into bounded buffers and finish: once they have, other clients are served as before while the
    thousand streams stay open and unread; closing the connection frees every stream."""
    server = fault_server.server
    pid = server.process.pid
    with Client(server.target, retry=NO_RETRIES, timeout=120) as client:
        alone = [client.generate(PROMPT, max_new_tokens=8, ignore_eos=True).timings.total for _ in range(3)]
        rss_before = rss_bytes(pid)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # the aio channel binds to the current loop (asyncio.run elsewhere unset it)
        try:
            channel = grpc.aio.insecure_channel(server.target)
            loop.run_until_complete(never_read(channel, SLOW_STREAMS, 32))
            try:
                client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
                burst = "served"
            except LoraplexError as error:
                burst = error.code.name
            drained = wait_idle(client)
            during: list[float] = []
            for _ in range(5 if full_run() else 3):
                result = client.generate(PROMPT, max_new_tokens=8, ignore_eos=True, timeout=120)
                assert result.usage.completion_tokens == 8
                during.append(result.timings.total)
            held = client.status().active_streams
            peak_rss = rss_bytes(pid, "VmHWM")
            loop.run_until_complete(channel.close())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        deadline = time.monotonic() + 60
        while (after := client.status()).active_streams and time.monotonic() < deadline:
            time.sleep(0.1)
    growth = (peak_rss - rss_before) / MIB
    record(
        5,
        f"{SLOW_STREAMS} unread streams: another client right after they open",
        burst,
        "others unaffected",
        burst == "served",
    )
    record(
        5,
        f"{SLOW_STREAMS} unread streams: another client after the burst",
        f"{max(during):.2f} s max vs {max(alone):.2f} s alone (server time), {held} streams held, "
        f"RSS +{growth:.0f} MiB",
        "others unaffected, memory bounded",
        max(during) <= 3 * max(alone) and growth < 256,
    )
    record(5, "unread streams after the client goes", f"{after.active_streams} active streams", "0", True)
    assert drained.running_requests == 0 and drained.waiting_requests == 0  # unread output holds no engine slot
    assert max(during) <= 3 * max(alone), (during, alone)
    assert growth < 256, f"RSS grew {growth:.0f} MiB"
    assert after.active_streams == 0 and after.running_requests == 0


def test_a_deadline_mid_generation_frees_the_slot_at_the_next_step(fault_server: FaultServer) -> None:
    target = fault_server.server.target
    with Client(target, retry=NO_RETRIES, timeout=120) as client, grpc.insecure_channel(target) as channel:
        assert wait_idle(client).running_requests == 0
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            prompt=PROMPT, sampling=generation_pb2.SamplingParameters(max_new_tokens=1000, ignore_eos=True)
        )
        received = 0
        with pytest.raises(grpc.RpcError) as raised:
            for _ in stub.GenerateStream(request, timeout=3.0):
                received += 1
        expired = time.monotonic()
        while client.status().running_requests and time.monotonic() - expired < 30:
            time.sleep(0.01)
        freed_after = time.monotonic() - expired
        assert client.status().running_requests == 0
        after = client.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
    record(
        5,
        "deadline mid-generation",
        f"{received} tokens, then DEADLINE_EXCEEDED; slot free {freed_after * 1e3:.0f} ms later",
        "freed at the next step",
        True,
    )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < received < 1000
    assert freed_after < 2.0 and after.usage.completion_tokens == 2
