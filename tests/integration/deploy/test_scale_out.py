"""Scale-out with bounded-load adapter affinity, for real on loopback: three ``loraplex-server`` replicas behind
Debian's HAProxy running the shipped deploy/haproxy template (consistent hashing on x-loraplex-affinity, or the
OpenAI request's ``model``, with ``hash-balance-factor``), traffic through ``loraplex.client`` and the HTTP API.
The same adapter always lands on the same replica, over gRPC and HTTP alike, until that replica is over the load
bound: then the overflow spills onto another replica. Killing a replica under load moves only its adapters, fails
exactly the attempts that were in flight on it (UNAVAILABLE; as many as HAProxy counted on it when it froze, while
every attempt HAProxy's request log puts on a survivor succeeded and the survivors' own counters agree), and the
client's retries of those succeed. Also: the image's HEALTHCHECK command against a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from transformers import AutoConfig

from loraplex.client import Client, RetryPolicy
from loraplex.client.affinity import AFFINITY_HEADER
from loraplex.proto.v1 import generation_pb2_grpc
from loraplex.server.core.shape import ModelShape
from tests.support.adapters import write_adapter
from tests.support.deploy.files import dockerfile_stages
from tests.support.deploy.haproxy import HaproxyProcess, free_port
from tests.support.deploy.replicas import owners, running_replicas, served, served_since
from tests.support.server_process import ServerProcess

REPLICAS = 3
ADAPTERS = [f"tenant-{index:02d}" for index in range(12)]
PROMPT = "Write a short note about the weather."
WORKERS = 6
HOT_CALLS = 6  # at once, for one adapter: twice what its replica may hold under the load bound
CALLS_PER_WORKER = 2  # bounded: 12 calls in all
LOAD_DEADLINE_S = 240.0
RETRY = RetryPolicy(max_attempts=6, initial_backoff=0.2, max_backoff=1.0)


@dataclass
class Fleet:
    replicas: list[ServerProcess]
    proxy: HaproxyProcess


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, base_dir: str) -> Iterator[Fleet]:
    shape = ModelShape.from_config(AutoConfig.from_pretrained(base_dir))
    root = tmp_path_factory.mktemp("adapters")
    for index, adapter_id in enumerate(ADAPTERS):
        write_adapter(root / adapter_id, shape, rank=8, seed=500 + index)
    logs = tmp_path_factory.mktemp("replicas")
    with (
        running_replicas(REPLICAS, logs, [root]) as replicas,
        HaproxyProcess.start(tmp_path_factory.mktemp("haproxy"), replicas) as proxy,
    ):
        yield Fleet(replicas, proxy)


def generate_each(target: str, adapters: list[str], times: int) -> None:
    with Client(target, timeout=60) as client:
        for adapter in adapters:
            for _ in range(times):
                client.generate(PROMPT, adapter=adapter, max_new_tokens=1)


def test_the_same_adapter_always_lands_on_the_same_replica(fleet: Fleet) -> None:
    before = served(fleet.replicas)
    generate_each(fleet.proxy.target, ADAPTERS, times=3)
    delta = served_since(before, served(fleet.replicas))
    placement = owners(delta)
    assert sorted(placement) == ADAPTERS
    for adapter, replicas in placement.items():
        assert len(replicas) == 1, f"{adapter} was served by replicas {replicas}"
        assert delta[replicas[0]][adapter] == 3
    assert len({replicas[0] for replicas in placement.values()}) >= 2, f"the adapters did not spread: {placement}"


def complete_over_http(proxy: HaproxyProcess, adapter: str) -> None:
    """One OpenAI completion through the proxy's HTTP frontend: the adapter only in the body's ``model``."""
    body = json.dumps({"model": adapter, "prompt": PROMPT, "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{proxy.http_url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def test_http_calls_for_an_adapter_land_where_its_grpc_calls_do(fleet: Fleet) -> None:
    adapters = ADAPTERS[:6]
    before = served(fleet.replicas)
    generate_each(fleet.proxy.target, adapters, times=1)
    for adapter in adapters:
        complete_over_http(fleet.proxy, adapter)
    delta = served_since(before, served(fleet.replicas))
    for adapter, replicas in owners(delta).items():
        assert len(replicas) == 1, f"{adapter}: gRPC and HTTP calls were served by replicas {replicas}"
        assert delta[replicas[0]][adapter] == 2


def test_a_hot_adapter_stays_on_its_replica_up_to_the_load_bound_then_spills_over(fleet: Fleet) -> None:
    hot = ADAPTERS[0]
    before = served(fleet.replicas)
    generate_each(fleet.proxy.target, [hot], times=1)
    ((owner,),) = owners(served_since(before, served(fleet.replicas))).values()
    before = served(fleet.replicas)
    together = threading.Barrier(HOT_CALLS)
    with Client(fleet.proxy.target, timeout=120) as client:

        def call() -> None:
            together.wait()
            client.generate(PROMPT, adapter=hot, max_new_tokens=32, ignore_eos=True)

        callers = [threading.Thread(target=call) for _ in range(HOT_CALLS)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(120)
    counts = [delta.get(hot, 0) for delta in served_since(before, served(fleet.replicas))]
    assert sum(counts) == HOT_CALLS
    # hash-balance-factor 150 over 3 replicas: HAProxy allows ceil(ceil(6 x 1.5) / 3) = 3 of 6 in flight on one.
    assert 1 <= counts[owner] <= 3, f"the owner r{owner} took {counts[owner]} of {HOT_CALLS}: {counts}"
    assert sum(1 for count in counts if count) >= 2, f"nothing spilled over: {counts}"


def test_the_images_health_check_command_says_serving_or_fails(fleet: Fleet) -> None:
    (healthcheck,) = dockerfile_stages()["runtime"].args("HEALTHCHECK")
    command = healthcheck.partition(" CMD ")[2]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the venv's `loraplex`

    def run(port: int) -> int:
        env = {**os.environ, "PATH": path, "LORAPLEX_SERVER__PORT": str(port)}
        return subprocess.run(["sh", "-c", command], env=env, timeout=60, check=False).returncode

    assert run(fleet.replicas[0].port) == 0
    assert run(free_port()) == 1  # nothing listens there


@dataclass(frozen=True)
class Attempt:
    request_id: str  # sent as x-request-id: HAProxy's log line for the attempt names it and the replica
    adapter: str
    code: grpc.StatusCode
    started: float  # time.monotonic()
    ended: float


class TaggedDetails(grpc.ClientCallDetails):
    """``details`` with one more metadata entry."""

    def __init__(self, details: grpc.ClientCallDetails, key: str, value: str) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = [*(details.metadata or ()), (key, value)]
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class AttemptLog(grpc.UnaryUnaryClientInterceptor):
    """Every attempt of every unary call (the client's retries included), each sent with an x-request-id of its
    own: its adapter, status code and when it started and ended."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self._ids = iter(range(1 << 30))
        self._lock = threading.Lock()

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        with self._lock:
            request_id = f"attempt-{next(self._ids)}"
        adapter = str(dict(details.metadata or ()).get(AFFINITY_HEADER))
        started = time.monotonic()
        outcome = continuation(TaggedDetails(details, "x-request-id", request_id), request)
        code = outcome.code()
        with self._lock:
            self.attempts.append(Attempt(request_id, adapter, code, started, time.monotonic()))
        return outcome


class RecordingClient(Client):
    """``loraplex.client.Client`` whose generation stub goes through an :class:`AttemptLog`."""

    def __init__(self, target: str, log: AttemptLog) -> None:
        self._log = log
        super().__init__(target, timeout=120, retry=RETRY)

    def _bind(self) -> None:
        super()._bind()
        self._generation = generation_pb2_grpc.GenerationStub(grpc.intercept_channel(self._channel, self._log))


@dataclass
class Load:
    """WORKERS threads, each making CALLS_PER_WORKER calls over its adapters; outcomes by adapter."""

    client: Client
    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, BaseException]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def worker(self, adapters: list[str], deadline: float) -> None:
        for call in range(CALLS_PER_WORKER):
            if time.monotonic() > deadline:
                return
            adapter = adapters[call % len(adapters)]
            try:
                self.client.generate(PROMPT, adapter=adapter, max_new_tokens=16, ignore_eos=True)
            except Exception as error:  # every failure is a finding, reported below
                with self._lock:
                    self.failed.append((adapter, error))
            else:
                with self._lock:
                    self.finished.append(adapter)


def replica_of_each_answer(proxy: HaproxyProcess, answered: list[Attempt], timeout: float = 10.0) -> dict[str, int]:
    """Request id -> index of the replica HAProxy's log says answered it, once the log has a line for every attempt
    in ``answered``. (HAProxy 2.6 writes no line for a stream its server's death cut off.)"""
    deadline = time.monotonic() + timeout
    while True:
        found = proxy.servers_by_request_id()
        missing = [a.request_id for a in answered if a.request_id not in found]
        if not missing:
            return {request_id: int(server.removeprefix("r")) for request_id, server in found.items()}
        assert time.monotonic() < deadline, f"HAProxy logged no line for {missing}:\n{proxy.log()}"
        time.sleep(0.1)


def streams_on(proxy: HaproxyProcess, replica: int) -> int:
    """The calls HAProxy has in flight on gRPC server r<replica> now (``scur``)."""
    return int(proxy.stats()[("loraplex_grpc", f"r{replica}")]["scur"])


def rotated(items: list[str], start: int) -> list[str]:
    start %= len(items)
    return items[start:] + items[:start]


def wait_for_running_requests(replica: ServerProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with Client(replica.target, timeout=10) as direct:
        while direct.status().active_streams < 2:
            assert time.monotonic() < deadline, "the victim never had requests in flight"
            time.sleep(0.05)


def test_a_killed_replica_moves_only_its_adapters_and_only_its_in_flight_requests_fail_then_retry(
    fleet: Fleet,
) -> None:
    # Where each adapter lives now (affinity is stable, so this is where the load will go too).
    before = served(fleet.replicas)
    generate_each(fleet.proxy.target, ADAPTERS, times=1)
    placement = {
        adapter: replicas[0] for adapter, replicas in owners(served_since(before, served(fleet.replicas))).items()
    }
    victim = max(range(REPLICAS), key=lambda index: sum(1 for owner in placement.values() if owner == index))
    victims_adapters = {adapter for adapter, owner in placement.items() if owner == victim}

    log = AttemptLog()
    with RecordingClient(fleet.proxy.target, log) as client:
        load = Load(client)
        deadline = time.monotonic() + LOAD_DEADLINE_S
        # Half the workers call the victim's adapters (so it has requests in flight), half the others'.
        victims, others = sorted(victims_adapters), sorted(set(ADAPTERS) - victims_adapters)
        assert others, f"every adapter landed on one replica: {placement}"
        shares = [rotated(victims if n % 2 == 0 else others, n) for n in range(WORKERS)]
        workers = [threading.Thread(target=load.worker, args=(shares[n], deadline)) for n in range(WORKERS)]
        served_before = served(fleet.replicas)
        for worker in workers:
            worker.start()
        wait_for_running_requests(fleet.replicas[victim])
        fleet.replicas[victim].process.send_signal(signal.SIGSTOP)  # frozen: nothing running there can finish now
        frozen_at = time.monotonic()
        on_victim = streams_on(fleet.proxy, victim)
        fleet.replicas[victim].kill()  # SIGKILL mid-load: no drain, connections just die
        killed_at = time.monotonic()
        for worker in workers:
            worker.join(LOAD_DEADLINE_S + 60)
    assert not load.failed, f"calls failed for good: {load.failed}"
    assert len(load.finished) == WORKERS * CALLS_PER_WORKER

    # Bounded load may put any adapter's call on the victim, so the adapter does not say where a call ran: HAProxy's
    # log line for the attempt's x-request-id does, for every answered attempt.
    answered = [a for a in log.attempts if a.code == grpc.StatusCode.OK]
    failed = [a for a in log.attempts if a.code != grpc.StatusCode.OK]
    ran_on = replica_of_each_answer(fleet.proxy, answered)
    assert failed, "no request was in flight on the killed replica"
    assert {a.code for a in failed} == {grpc.StatusCode.UNAVAILABLE}, failed
    # The failures are the calls in flight on the victim: as many as HAProxy had there when it froze, each in flight
    # then (sent before the SIGKILL, not done at the SIGSTOP), none answered by anyone.
    assert len(failed) == on_victim, f"{len(failed)} attempts failed, HAProxy had {on_victim} on r{victim}"
    for attempt in failed:
        assert attempt.started < killed_at and attempt.ended > frozen_at, attempt
        assert attempt.request_id not in ran_on, (
            f"{attempt} failed but HAProxy logged it on r{ran_on[attempt.request_id]}"
        )
    # Everything HAProxy sent a survivor succeeded, and what the survivors say they served is exactly that.
    delta = served_since(served_before, served(fleet.replicas))
    for index in (index for index in range(REPLICAS) if index != victim):
        sent = Counter(a.adapter for a in answered if ran_on[a.request_id] == index)
        assert sent == Counter(delta[index]), f"r{index}: HAProxy sent {dict(sent)}, it served {delta[index]}"

    # Afterwards: the victim's adapters live on survivors; every other adapter stayed where it was.
    before = served(fleet.replicas)
    generate_each(fleet.proxy.target, ADAPTERS, times=2)
    moved = owners(served_since(before, served(fleet.replicas)))
    for adapter in ADAPTERS:
        (now,) = moved[adapter]
        if adapter in victims_adapters:
            assert now != victim
        else:
            assert now == placement[adapter], f"{adapter} moved from {placement[adapter]} to {now}"
