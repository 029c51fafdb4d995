"""Resilience scenario 6, shutdown, on real servers: SIGTERM under a steady load of loraplex.v1 streams and OIP
calls (health NOT_SERVING before the first refusal, every accepted request finishes within the grace period, new
ones get UNAVAILABLE, exit 0); SIGKILL in the middle of route changes and adapter uploads, then a restart: the
routes file and the adapter registry come back whole (every acknowledged change, nothing half-written).

``tests/integration/api/test_shutdown.py`` drains a fixed set of streams started before the signal; here clients
keep sending through the signal, so the drain meets arrivals of both protocols at every moment.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client import Client
from loraplex.client.retry import NO_RETRIES
from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.proto.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.api.helpers import request
from tests.support.adapters import write_adapter
from tests.support.resilience import full_run, record
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.resilience

NEW_TOKENS = 10
GRACE_S = 60.0
MAX_RUNNING = 4
ADAPTERS = tuple(f"k{i}" for i in range(4))
USERS = tuple(f"user-{i}" for i in range(5))
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Path:
    root = tmp_path_factory.mktemp("shutdown-adapters")
    for index, adapter_id in enumerate(ADAPTERS):
        write_adapter(root / adapter_id, base_shape, rank=4, layers=[0, 1], seed=60 + index, strength=3.0)
    return root


@dataclass(frozen=True)
class Attempt:
    protocol: str  # "v1 stream" | "oip"
    sent: float  # monotonic seconds
    answered: float
    code: grpc.StatusCode
    tokens: int  # generated tokens received
    details: str


def stream_once(channel: grpc.Channel, adapter_id: str) -> tuple[grpc.StatusCode, int, str]:
    stub = generation_pb2_grpc.GenerationStub(channel)
    tokens = 0
    try:
        for message in stub.GenerateStream(
            request(adapter_id=adapter_id, max_new_tokens=NEW_TOKENS, ignore_eos=True), timeout=GRACE_S + 60
        ):
            tokens += len(message.token_ids)
    except grpc.RpcError as error:
        return error.code(), tokens, error.details() or ""
    return grpc.StatusCode.OK, tokens, ""


def infer_once(channel: grpc.Channel, adapter_id: str) -> tuple[grpc.StatusCode, int, str]:
    text = oip.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Write a short poem about the sea.")
    message = oip.ModelInferRequest(model_name=adapter_id, inputs=[text])
    message.parameters["max_tokens"].int64_param = NEW_TOKENS  # OIP has no ignore_eos: may stop earlier
    try:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=GRACE_S + 60)
    except grpc.RpcError as error:
        return error.code(), 0, error.details() or ""
    return grpc.StatusCode.OK, response.parameters["completion_tokens"].int64_param, ""


class Load:
    """Client threads that send generations back to back until each is refused once after the signal."""

    def __init__(self, channel: grpc.Channel, clients: int) -> None:
        self.attempts: list[Attempt] = []
        self.signalled = threading.Event()
        self._channel = channel
        self._lock = threading.Lock()
        self.clients = clients
        self._threads = [threading.Thread(target=self._run, args=(index,)) for index in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(GRACE_S + 120)

    def _run(self, index: int) -> None:
        adapter_id = ADAPTERS[index % len(ADAPTERS)]
        protocol, once = ("oip", infer_once) if index % 2 else ("v1 stream", stream_once)
        while True:
            sent = time.monotonic()
            code, tokens, details = once(self._channel, adapter_id)
            with self._lock:
                self.attempts.append(Attempt(protocol, sent, time.monotonic(), code, tokens, details))
            if code != grpc.StatusCode.OK and self.signalled.is_set():
                return


def watch_health(channel: grpc.Channel, seen: list[tuple[float, int]]) -> None:
    """Records (arrival time, status) of every health update until the stream ends."""
    try:
        for update in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
            seen.append((time.monotonic(), update.status))
    except grpc.RpcError:
        return


def test_sigterm_under_load_drains_every_accepted_request_and_refuses_the_rest(
    tmp_path: Path, adapter_root: Path
) -> None:
    flags = (f"--engine.max-running={MAX_RUNNING}", "--engine.max-queue=64", f"--server.grace-period-s={GRACE_S}")
    server = ServerProcess.start(tmp_path / "server.log", [adapter_root], *flags)
    channel = grpc.insecure_channel(server.target)
    health: list[tuple[float, int]] = []
    watcher = threading.Thread(target=watch_health, args=(channel, health))
    watcher.start()
    load = Load(channel, clients=12 if full_run() else 8)
    try:
        load.start()
        status = server_pb2_grpc.ServerStub(channel).GetStatus
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the batch is full, some wait, and some requests already completed
            now = status(server_pb2.GetStatusRequest())
            if now.running_requests == MAX_RUNNING and now.waiting_requests and len(load.attempts) >= 2:
                break
            time.sleep(0.02)
        signalled = time.monotonic()
        load.signalled.set()
        server.process.terminate()  # SIGTERM
        load.join()
        exit_code = server.process.wait(GRACE_S + 60)
        exited = time.monotonic()
        watcher.join(10)
    finally:
        server.kill()
        channel.close()

    attempts = load.attempts
    completed = [a for a in attempts if a.code == grpc.StatusCode.OK]
    refused = [a for a in attempts if a.code == UNAVAILABLE]
    drained = [a for a in completed if a.sent < signalled < a.answered]  # in flight when the signal came
    # A call that reaches the socket in the instant the listener closes (after the drain) is cut by gRPC itself
    # with CANCELLED, before any handler sees it: never started, so nothing is lost, but not UNAVAILABLE either.
    drain_end = max(a.answered for a in completed) - 0.05  # the last accepted request answered (± thread jitter)
    cut = [a for a in attempts if a.code == grpc.StatusCode.CANCELLED and a.tokens == 0 and a.sent > drain_end]
    assert len(completed) + len(refused) + len(cut) == len(attempts), [
        a for a in attempts if a not in completed + refused + cut
    ]
    assert all(a.tokens == NEW_TOKENS if a.protocol == "v1 stream" else a.tokens > 0 for a in completed)
    assert all(a.tokens == 0 for a in refused)  # a refused one never started to answer
    assert len(drained) >= MAX_RUNNING + 1  # the full batch and the queue behind it
    assert all(a.answered > signalled for a in refused), "refused before the signal"
    assert any("draining" in a.details for a in refused), [a.details for a in refused]
    not_serving = [t for t, s in health if s == health_pb2.HealthCheckResponse.NOT_SERVING and t > signalled]
    first_refusal = min(a.answered for a in refused)
    assert not_serving and not_serving[0] <= first_refusal
    assert exit_code == 0 and exited - signalled <= GRACE_S
    log = server.log()
    assert "Traceback" not in log and "still running after the grace period" not in log
    figure = (
        f"SIGTERM with {len(drained)} requests in flight (batch of {MAX_RUNNING} + queue), {load.clients} "
        f"clients sending v1 streams and OIP calls: {len(drained)} finished whole in {exited - signalled:.1f} s "
        f"(grace {GRACE_S:.0f} s), {len(refused)} new ones UNAVAILABLE, {len(cut)} CANCELLED by the closing "
        f"listener, 0 lost; health NOT_SERVING "
        f"{(first_refusal - not_serving[0]) * 1000:.0f} ms before the first refusal; exit {exit_code}"
    )
    record(6, "shutdown", figure, "NOT_SERVING first, accepted finish within grace, new UNAVAILABLE, exit 0", True)
    print(figure)


def content_hash(directory: Path) -> str:
    return hashlib.sha256((directory / CONFIG_FILE).read_bytes() + (directory / WEIGHTS_FILE).read_bytes()).hexdigest()[
        :16
    ]


@dataclass
class Snapshot:
    """What a client can see of the registry and the routes."""

    routes: dict[str, list[tuple[str, str, float]]]  # route -> (variant, adapter, weight)
    sticky: dict[str, str]  # user -> variant on the route "stable"
    hashes: dict[str, str]  # adapter id -> content hash, loaded
    tokens: list[int]  # greedy tokens of one adapter


def snapshot(channel: grpc.Channel, adapter_ids: tuple[str, ...]) -> Snapshot:
    routing = routing_pb2_grpc.RoutingStub(channel)
    routes = {
        r.name: [(v.name, v.adapter_id, v.weight) for v in r.variants]
        for r in routing.ListRoutes(routing_pb2.ListRoutesRequest()).routes
    }
    generation = generation_pb2_grpc.GenerationStub(channel)
    sticky = {}
    for user in USERS:
        routed = request(max_new_tokens=1)
        routed.route, routed.user_key = "stable", user
        sticky[user] = generation.Generate(routed, timeout=60).served_by.variant
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    hashes = {
        a: adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=a), timeout=60).content_hash
        for a in adapter_ids
    }
    answer = generation.Generate(request(adapter_id=ADAPTERS[2], max_new_tokens=6, ignore_eos=True), timeout=60)
    return Snapshot(routes, sticky, hashes, list(answer.token_ids))


def test_sigkill_during_route_changes_and_uploads_then_restart_keeps_every_acknowledged_change(
    tmp_path: Path, adapter_root: Path, base_shape: ModelShape
) -> None:
    routes_file = tmp_path / "routes.yaml"
    variants = [
        {"name": "a", "adapter": ADAPTERS[0], "weight": 50},
        {"name": "b", "adapter": ADAPTERS[1], "weight": 50},
    ]
    routes_file.write_text(yaml.safe_dump({"routes": {"stable": {"variants": variants}}}))
    upload_source = write_adapter(tmp_path / "to-upload", base_shape, rank=4, layers=[0], seed=77)
    flags = (f"--routes-file={routes_file}",)
    server = ServerProcess.start(tmp_path / "first.log", [adapter_root], *flags)
    channel = grpc.insecure_channel(server.target)
    before = snapshot(channel, ADAPTERS)
    acknowledged_routes: dict[str, float] = {}
    acknowledged_uploads: list[str] = []

    def change_routes() -> None:
        routing = routing_pb2_grpc.RoutingStub(channel)
        for index in range(10_000):
            weight = float(1 + index % 99)
            route = routing_pb2.Route(
                name=f"churn-{index}",
                variants=[
                    routing_pb2.Variant(name="x", adapter_id=ADAPTERS[2], weight=weight),
                    routing_pb2.Variant(name="y", adapter_id=ADAPTERS[3], weight=100 - weight),
                ],
            )
            try:
                routing.SetRoute(routing_pb2.SetRouteRequest(route=route), timeout=30)
            except grpc.RpcError:
                return
            acknowledged_routes[route.name] = weight

    def upload() -> None:
        with Client(server.target, retry=NO_RETRIES) as client:
            for index in range(10_000):
                try:
                    client.upload_adapter(upload_source, f"uploaded-{index}", timeout=30)
                except Exception:  # the server died mid-upload
                    return
                acknowledged_uploads.append(f"uploaded-{index}")

    workers = [threading.Thread(target=change_routes), threading.Thread(target=upload)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 120
    while (len(acknowledged_routes) < 4 or len(acknowledged_uploads) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL, while both kinds of change are under way
    for worker in workers:
        worker.join(60)
    channel.close()
    assert len(acknowledged_routes) >= 4 and len(acknowledged_uploads) >= 2

    with ServerProcess.start(tmp_path / "second.log", [adapter_root], *flags) as restarted:
        channel = grpc.insecure_channel(restarted.target)
        index = oip_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(oip.RepositoryIndexRequest())
        on_disk = sorted(m.name for m in index.models if m.name != "base")
        after = snapshot(channel, tuple(on_disk))
        assert restarted.stop() == 0
        channel.close()

    churn = {name: v for name, v in after.routes.items() if name.startswith("churn-")}
    assert set(acknowledged_routes) <= set(churn) and len(churn) - len(acknowledged_routes) <= 1  # + one in flight
    for name, weight in acknowledged_routes.items():
        assert churn[name] == [("x", ADAPTERS[2], weight), ("y", ADAPTERS[3], 100 - weight)]
    assert after.routes["stable"] == before.routes["stable"] and after.sticky == before.sticky
    uploads = [a for a in on_disk if a.startswith("uploaded-")]
    assert set(acknowledged_uploads) <= set(uploads) and len(uploads) - len(acknowledged_uploads) <= 1
    assert all(after.hashes[a] == content_hash(upload_source) for a in uploads)  # whole, none half-written
    assert {a: after.hashes[a] for a in ADAPTERS} == before.hashes and after.tokens == before.tokens
    assert on_disk == sorted((*ADAPTERS, *uploads))
    figure = (
        f"SIGKILL after {len(acknowledged_routes)} acknowledged route changes and {len(acknowledged_uploads)} "
        f"uploads, more under way: after restart {len(churn)} routes and {len(uploads)} uploaded adapters, every "
        "acknowledged one whole, sticky users and adapter outputs unchanged, nothing half-written"
    )
    record(6, "shutdown", figure, "routes and adapter registry intact after SIGKILL + restart", True)
    print(figure)
