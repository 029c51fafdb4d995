"""Resilience scenario 3, fuzzing: 10,000 generated requests against every RPC of loraplex.v1 and the Open
Inference Protocol on a real server: 0 crashes, only each RPC's documented status codes, and the server still
answers normal requests afterwards.

Requests are wire bytes sent through generic gRPC calls, so they can hold what the generated classes refuse to
build (``tests/support/proto_strategies.py``): invalid UTF-8 in strings, out-of-range enums, huge repeated
fields, unknown fields, truncated messages. Each hypothesis-drawn message is sent as drawn and as four mutants
(bit flips, cuts, splices: a classic mutation fuzzer, which keeps 10,000 requests within the suite's time), and
every method also gets raw random bytes. The server's limits are small (2 new tokens, 32 prompt tokens), so the
fuzzed requests that pass validation generate cheaply; they still go through the engine.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import yaml
from google.protobuf.descriptor import Descriptor
from hypothesis import given
from hypothesis import strategies as st

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, routing_pb2, server_pb2
from loraplex.server.core.shape import ModelShape
from tests.integration.api.helpers import request
from tests.support.adapters import write_adapter
from tests.support.proto_strategies import message_bytes
from tests.support.resilience import full_run, fuzz_settings, record
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.resilience

MAX_RANK = 8
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CALL_TIMEOUT_S = 120.0
MUTANTS = 4  # each drawn message is also sent as this many mutants
RAW_PER_METHOD = 40
SERVER_FLAGS = (
    f"--adapters.max-rank={MAX_RANK}",
    "--engine.max-new-tokens=2",
    "--server.default-max-new-tokens=1",
    "--engine.max-prompt-tokens=32",
    "--engine.max-seq-len=64",
    "--server.max-prompt-chars=2000",
    "--engine.max-running=64",
    "--engine.max-queue=2048",
    f"--server.max-message-bytes={MAX_MESSAGE_BYTES}",
)
ROUTE = "fuzz-route"
# Names the server knows, mixed into every string field so fuzzed requests get past the first checks.
INTERESTING = (
    "", "base", "good", "good2", "too-big", "broken", "missing", "a/b", "../good", "good/..", "/etc/passwd",
    "*", "t?", ROUTE, "v1", "v2", "shadow", "Hello", "The capital of France is", "user", "system", "assistant",
    "tool", "text_input", "text_output", "BYTES", "INT32", "INT64", "FP32", "FP64", "BOOL", "UINT8", "max_tokens",
    "temperature", "top_p", "top_k", "seed", "stop", "stream", "user_key", "pin", "triton_final_response",
    "triton_enable_empty_final_response", "1", "2", "0", "-1", "nan", "READY",
)  # fmt: skip

OK, BAD, GONE = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
FAILED, BUSY, EXISTS = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
)
GENERATION = frozenset({OK, BAD, GONE, FAILED, BUSY})  # generation.proto's list, without auth (off) and draining
# Every method may answer INVALID_ARGUMENT (a message that does not decode); the rest as its proto documents.
ALLOWED: dict[str, frozenset[grpc.StatusCode]] = {
    "/loraplex.v1.Generation/Generate": GENERATION,
    "/loraplex.v1.Generation/GenerateStream": GENERATION,
    "/loraplex.v1.Generation/Tokenize": frozenset({OK, BAD}),
    "/loraplex.v1.Adapters/LoadAdapter": frozenset({OK, BAD, GONE, FAILED}),
    "/loraplex.v1.Adapters/UnloadAdapter": frozenset({OK, BAD, GONE}),
    "/loraplex.v1.Adapters/ListAdapters": frozenset({OK, BAD}),
    "/loraplex.v1.Adapters/GetAdapter": frozenset({OK, BAD, GONE}),
    "/loraplex.v1.Adapters/UploadAdapter": frozenset({OK, BAD, GONE, FAILED, BUSY, grpc.StatusCode.ABORTED}),
    "/loraplex.v1.Routing/SetRoute": frozenset({OK, BAD, GONE, FAILED}),
    "/loraplex.v1.Routing/DeleteRoute": frozenset({OK, BAD, GONE}),
    "/loraplex.v1.Routing/ListRoutes": frozenset({OK, BAD}),
    "/loraplex.v1.Routing/Feedback": frozenset({OK, BAD, GONE, EXISTS, FAILED}),
    "/loraplex.v1.Routing/GetRouteReport": frozenset({OK, BAD, GONE}),
    "/loraplex.v1.Server/GetStatus": frozenset({OK, BAD}),
    "/inference.GRPCInferenceService/ServerLive": frozenset({OK, BAD}),
    "/inference.GRPCInferenceService/ServerReady": frozenset({OK, BAD}),
    "/inference.GRPCInferenceService/ServerMetadata": frozenset({OK, BAD}),
    "/inference.GRPCInferenceService/ModelReady": frozenset({OK, BAD, GONE}),
    "/inference.GRPCInferenceService/ModelMetadata": frozenset({OK, BAD, GONE}),
    "/inference.GRPCInferenceService/ModelInfer": GENERATION,
    "/inference.GRPCInferenceService/ModelStreamInfer": GENERATION,
    "/inference.GRPCInferenceService/RepositoryIndex": frozenset({OK, BAD}),
    "/inference.GRPCInferenceService/RepositoryModelLoad": frozenset({OK, BAD, GONE, FAILED}),
    "/inference.GRPCInferenceService/RepositoryModelUnload": frozenset({OK, BAD, GONE}),
}


@dataclass(frozen=True)
class Method:
    path: str
    input_type: Descriptor
    client_streaming: bool
    server_streaming: bool


def all_methods() -> list[Method]:
    services = [
        module.DESCRIPTOR.services_by_name[name]
        for module, name in (
            (generation_pb2, "Generation"),
            (adapters_pb2, "Adapters"),
            (routing_pb2, "Routing"),
            (server_pb2, "Server"),
            (oip, "GRPCInferenceService"),
        )
    ]
    return [
        Method(f"/{s.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming)
        for s in services
        for m in s.methods
    ]


METHODS = all_methods()


@dataclass(frozen=True)
class Outcome:
    method: str
    body: bytes
    code: grpc.StatusCode
    details: str


def call(channel: grpc.Channel, method: Method, body: bytes) -> list[Outcome]:
    """Sends ``body`` to ``method`` and returns its status (and, for ModelStreamInfer, each in-stream error)."""
    outcomes: list[Outcome] = []
    try:
        if method.client_streaming and not method.server_streaming:
            upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(method.path)
            upload(iter([body]), timeout=CALL_TIMEOUT_S)
        elif method.client_streaming:
            duplex: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method.path)
            for raw in duplex(iter([body]), timeout=CALL_TIMEOUT_S):
                error = oip.ModelStreamInferResponse.FromString(raw).error_message
                if error:  # "CODE: message" of one failed request; the stream stays open
                    name, _, details = error.partition(": ")
                    code = grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
                    outcomes.append(Outcome(method.path, body, code, details))
        elif method.server_streaming:
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method.path)
            for _ in stream(body, timeout=CALL_TIMEOUT_S):
                pass
        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method.path)
            unary(body, timeout=CALL_TIMEOUT_S)
        outcomes.append(Outcome(method.path, body, OK, ""))
    except grpc.RpcError as error:
        outcomes.append(Outcome(method.path, body, error.code(), error.details() or ""))
    return outcomes


def mutants(body: bytes, count: int) -> list[bytes]:
    """``count`` deterministic mutations of ``body``: bit flips, cuts, inserted or duplicated bytes."""
    rng = random.Random(body)
    out: list[bytes] = []
    for _ in range(count):
        data = bytearray(body or b"\x00")
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) or 1)
            kind = rng.randrange(5)
            if kind == 0 and data:
                data[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del data[at:]
            elif kind == 2:
                data[at:at] = bytes([rng.choice((0x00, 0x80, 0xFF, 0x0A, 0x12, 0x7F))])
            elif kind == 3:
                data[at:at] = data[at : at + rng.randint(1, 16)]
            elif data:
                data[at] = rng.randrange(256)
        out.append(bytes(data))
    return out


def allowed(outcome: Outcome) -> bool:
    if outcome.code == BUSY and len(outcome.body) > MAX_MESSAGE_BYTES:
        return True  # over server.max_message_bytes: gRPC's own refusal
    return outcome.code in ALLOWED[outcome.method]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz-adapters")
    for index, adapter_id in enumerate(("good", "good2")):
        write_adapter(root / adapter_id, base_shape, rank=4, layers=[0], seed=30 + index)
    write_adapter(root / "too-big", base_shape, rank=2 * MAX_RANK, layers=[0], seed=32)
    (write_adapter(root / "broken", base_shape, rank=4, layers=[0], seed=33) / "adapter_model.safetensors").write_bytes(
        b"\x00" * 12
    )
    directory = tmp_path_factory.mktemp("fuzz-server")
    routes = directory / "routes.yaml"
    variants = [{"name": "v1", "adapter": "good", "weight": 50}, {"name": "v2", "adapter": "base", "weight": 50}]
    routes.write_text(yaml.safe_dump({"routes": {ROUTE: {"variants": variants}}}))
    with ServerProcess.start(directory / "server.log", [root], *SERVER_FLAGS, f"--routes-file={routes}") as server:
        yield server
        assert server.stop() == 0, server.log()[-3000:]


class Fuzzer:
    """Sends requests from a thread pool, keeping at most ``window`` in flight; remembers every outcome."""

    def __init__(self, channel: grpc.Channel, workers: int = 48, window: int = 256) -> None:
        self._channel = channel
        self._pool = ThreadPoolExecutor(workers)
        self._window = window
        self._pending: list[Future[list[Outcome]]] = []
        self.outcomes: list[Outcome] = []
        self.sent = 0

    def send(self, method: Method, body: bytes) -> None:
        self._pending.append(self._pool.submit(call, self._channel, method, body))
        self.sent += 1
        if len(self._pending) >= self._window:
            self._collect(self._window // 2)

    def _collect(self, keep: int) -> None:
        while len(self._pending) > keep:
            self.outcomes.extend(self._pending.pop(0).result())

    def finish(self) -> list[Outcome]:
        self._collect(0)
        self._pool.shutdown()
        return self.outcomes


def drawn_calls() -> st.SearchStrategy[tuple[Method, bytes]]:
    return st.one_of(
        [st.tuples(st.just(m), message_bytes(m.input_type, INTERESTING)) for m in METHODS]  # every method alike
    )


def run_hypothesis(examples: int, send: Callable[[Method, bytes], None]) -> None:
    @fuzz_settings(examples)
    @given(drawn_calls())
    def fuzz(drawn: tuple[Method, bytes]) -> None:
        method, body = drawn
        send(method, body)
        for mutant in mutants(body, MUTANTS):
            send(method, mutant)

    fuzz()


def test_10000_fuzzed_requests_get_only_documented_codes_and_the_server_keeps_serving(
    fuzz_server: ServerProcess,
) -> None:
    examples = 10_000 if full_run() else 2_000
    started = time.monotonic()
    with grpc.insecure_channel(fuzz_server.target) as channel:
        fuzzer = Fuzzer(channel)
        run_hypothesis(examples, fuzzer.send)
        rng = random.Random(7)
        for method in METHODS:  # raw random bytes, every method
            for _ in range(RAW_PER_METHOD):
                fuzzer.send(method, rng.randbytes(rng.choice((1, 3, 8, 40, 300))))
        outcomes = fuzzer.finish()
        elapsed = time.monotonic() - started

        assert fuzz_server.process.poll() is None, fuzz_server.log()[-3000:]
        adapters = adapters_pb2_grpc.AdaptersStub(channel)
        adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="good"), timeout=60)
        generate = channel.unary_unary(
            "/loraplex.v1.Generation/Generate",
            request_serializer=generation_pb2.GenerateRequest.SerializeToString,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        after = [generate(request("Hello", adapter_id=a, max_new_tokens=2), timeout=60) for a in ("", "good")]

    codes = Counter(outcome.code.name for outcome in outcomes)
    wrong = [o for o in outcomes if not allowed(o)]
    log = fuzz_server.log()
    crashes = log.count("Traceback") + log.count("unexpected error in an RPC")
    figure = (
        f"{fuzzer.sent:,} requests ({examples:,} hypothesis-drawn × {1 + MUTANTS} with mutants, "
        f"{RAW_PER_METHOD * len(METHODS)} raw) over {len(METHODS)} RPCs in {elapsed:.0f} s: {crashes} crashes, "
        f"{len(wrong)} undocumented codes; codes {dict(codes.most_common())}"
    )
    passed = not wrong and crashes == 0 and all(r.usage.completion_tokens == 2 for r in after)
    record(3, "fuzzing", figure, "0 crashes, only documented codes, serves afterwards", passed)
    print(figure)
    assert fuzzer.sent >= 10_000
    assert not wrong, (
        Counter((o.method, o.code.name) for o in wrong),
        [(o.method, o.code.name, o.details[:300], o.body[:80].hex()) for o in wrong[:10]],
    )
    assert crashes == 0, log[-4000:]
    assert [r.usage.completion_tokens for r in after] == [2, 2]
    assert after[1].served_by.adapter_id == "good"
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0
