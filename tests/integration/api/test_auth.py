"""Bearer-token auth on a server of its own: who may call what, lists that show only what a tenant may use, open
health and reflection, tokens absent from the log; and a full engine queue answering RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc
from tests.integration.api.helpers import ADAPTERS, request, run_stock_client
from tests.support.server_process import ServerProcess

ADMIN = "ops-token-5b0c1d2e3f4a5b6c7d8e"
TEAM_A = "team-a-token-0f1e2d3c4b5a6978"
TEAM_B = "team-b-token-99aa88bb77cc66dd"
LIST_LIMIT = 8  # below the 10 adapters each team may use
TOKENS = {
    ADMIN: {"tenant": "ops", "adapters": ["*"], "routes": ["*"], "admin": True},
    TEAM_A: {"tenant": "team-a", "adapters": ["t0*", "base"], "routes": ["checkout-*"]},
    TEAM_B: {"tenant": "team-b", "adapters": ["t1*"]},
}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("auth")
    tokens = directory / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(TOKENS))
    flags = (
        f"--auth.tokens-file={tokens}",
        "--engine.max-running=1",
        "--engine.max-queue=1",
        f"--adapters.list-limit={LIST_LIMIT}",
    )
    with ServerProcess.start(directory / "server.log", [adapter_root], *flags) as process:
        yield process
        assert process.stop() == 0


@pytest.fixture(scope="module")
def channel(auth_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_server.target) as opened:
        yield opened


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def status(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "missing bearer token"),
        ((("authorization", "Bearer not-a-known-token-at-all"),), "invalid bearer token"),
        ((("authorization", f"Basic {TEAM_A}"),), "malformed authorization metadata"),
    ],
)
def test_calls_without_a_valid_token_are_unauthenticated(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], says: str
) -> None:
    calls = [
        (generation_pb2_grpc.GenerationStub(channel).Generate, request(max_new_tokens=1)),
        (adapters_pb2_grpc.AdaptersStub(channel).ListAdapters, adapters_pb2.ListAdaptersRequest()),
        (oip_grpc.GRPCInferenceServiceStub(channel).ServerReady, oip.ServerReadyRequest()),
    ]
    for call, message in calls:
        code, message_text = status(call, message, metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and message_text.startswith(says)


def test_tenants_use_only_their_adapters_and_routes(channel: grpc.Channel) -> None:
    generate = generation_pb2_grpc.GenerationStub(channel).Generate
    assert (
        status(generate, request(adapter_id="t01", max_new_tokens=1), metadata=bearer(TEAM_A))[0] == grpc.StatusCode.OK
    )
    assert status(generate, request(max_new_tokens=1), metadata=bearer(TEAM_A))[0] == grpc.StatusCode.OK
    assert status(generate, request(adapter_id="t11"), metadata=bearer(TEAM_A)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'team-a' may not use adapter 't11'",
    )
    assert status(generate, request(), metadata=bearer(TEAM_B)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'team-b' may not use adapter 'base'",
    )
    routed = request()
    routed.route = "checkout-2025"
    assert status(generate, routed, metadata=bearer(TEAM_A))[0] == grpc.StatusCode.NOT_FOUND  # allowed, not configured
    assert status(generate, routed, metadata=bearer(TEAM_B)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'team-b' may not use route 'checkout-2025'",
    )
    infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    message = oip.ModelInferRequest(model_name="t12", inputs=[])
    assert status(infer, message, metadata=bearer(TEAM_A))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_admin_rpcs_need_an_admin_tenant_and_lists_show_only_what_a_tenant_may_use(channel: grpc.Channel) -> None:
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    for adapter_id in ("t01", "t11"):
        adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id), metadata=bearer(ADMIN))
    assert status(adapters.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id="t02"), metadata=bearer(TEAM_A)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'team-a' may not call the admin RPC /loraplex.v1.Adapters/LoadAdapter",
    )
    upload = adapters_pb2.UploadAdapterChunk(header=adapters_pb2.UploadAdapterHeader(adapter_id="t03"))
    assert status(adapters.UploadAdapter, iter([upload]), metadata=bearer(TEAM_A)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'team-a' may not call the admin RPC /loraplex.v1.Adapters/UploadAdapter",
    )
    unload = oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload
    code, _ = status(unload, oip.RepositoryModelUnloadRequest(model_name="t01"), metadata=bearer(TEAM_A))
    assert code == grpc.StatusCode.PERMISSION_DENIED

    def listed(token: str) -> set[str]:
        response = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=bearer(token))
        return {a.adapter_id for a in response.adapters}

    assert listed(ADMIN) >= {"t01", "t11"}  # loaded: kept however many adapters the roots hold
    assert "t01" in listed(TEAM_A) <= {a for a in ADAPTERS if a.startswith("t0")}
    assert "t11" in listed(TEAM_B) <= {a for a in ADAPTERS if a.startswith("t1")}
    index = oip_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
        oip.RepositoryIndexRequest(), metadata=bearer(TEAM_B)
    )
    names = {m.name for m in index.models}
    assert len(names) == LIST_LIMIT and "t11" in names <= {a for a in ADAPTERS if a.startswith("t1")}


def test_a_tenants_list_counts_and_cuts_only_its_own_adapters(channel: grpc.Channel) -> None:
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="t07", pin=True), metadata=bearer(ADMIN))
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="t18", pin=True), metadata=bearer(ADMIN))
    try:
        team_a = [a for a in ADAPTERS if a.startswith("t0")]
        for limit in (0, 100):  # unset and above the cap: the server's adapters.list_limit
            response = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(limit=limit), metadata=bearer(TEAM_A))
            ids = [a.adapter_id for a in response.adapters]
            assert (len(ids), response.truncated, response.total) == (LIST_LIMIT, True, len(team_a))
            assert ids == sorted(ids) and set(ids) <= set(team_a) and "t07" in ids
        (pinned,) = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(limit=1), metadata=bearer(TEAM_A)).adapters
        assert (pinned.adapter_id, pinned.pinned, pinned.version >= 1) == ("t07", True, True)  # not team-b's t18
    finally:
        for adapter_id in ("t07", "t18"):
            adapters.LoadAdapter(
                adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=False), metadata=bearer(ADMIN)
            )


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "loraplex.v1.Generation" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_the_stock_oip_client_authenticates_with_a_header(auth_server: ServerProcess) -> None:
    report = run_stock_client(auth_server.target, "--token", TEAM_A)
    assert report["live"] is True and report["infer"]["completion_tokens"] >= 1
    assert report["no_token"]["status"] == "StatusCode.UNAUTHENTICATED"


def test_a_full_engine_queue_answers_resource_exhausted_at_once(channel: grpc.Channel) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    long = request(adapter_id="t03", max_new_tokens=60, ignore_eos=True)
    running = stub.GenerateStream(long, metadata=bearer(ADMIN))
    next(running)  # running: the only running slot (engine.max_running=1)
    waiting = stub.GenerateStream(long, metadata=bearer(ADMIN))
    time.sleep(0.3)  # queued: the only queue place (engine.max_queue=1)
    started = time.monotonic()
    code, message = status(stub.Generate, request(adapter_id="t03"), metadata=bearer(ADMIN))
    assert (code, time.monotonic() - started < 1.0) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
    assert "engine.max_queue=1" in message and "retry later" in message
    running.cancel()
    waiting.cancel()


def test_tokens_never_reach_the_log(auth_server: ServerProcess) -> None:
    log = auth_server.log()
    assert "auth on, 3 tokens" in log
    assert not [token for token in TOKENS if token in log]


def test_a_bad_tokens_file_stops_start_up_without_echoing_tokens(tmp_path: Path) -> None:
    secret = "a-long-enough-secret-token"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(json.dumps({secret: {"tenant": "y", "admin": "maybe"}}))
    done = subprocess.run(
        [sys.executable, "-m", "loraplex.server.main", "--port=0", f"--auth.tokens-file={tokens}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "entry #1 (tenant 'y'): admin: Input should be a valid boolean" in done.stderr
    assert secret not in done.stderr
