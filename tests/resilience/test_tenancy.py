"""Resilience scenario 7, tenancy and auth, over mutual TLS on a real server: tenant A's token cannot generate with
tenant B's adapters or routes (loraplex.v1 and OIP, unary and streaming), cannot call any admin RPC, and cannot
learn B's adapter or route names from list calls, metadata calls or feedback; TLS and mTLS connections work, and
plaintext (or a TLS client without a certificate when one is required) is refused.

``tests/integration/api/test_auth.py`` and ``test_transport.py`` check each rule once on plaintext or without
tokens; here every RPC that names an adapter or a route is tried across tenants, on the TLS transports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.proto.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)
from loraplex.server.core.shape import ModelShape
from tests.integration.api.helpers import request
from tests.support.adapters import write_adapter
from tests.support.resilience import record
from tests.support.server_process import ServerProcess
from tests.support.tls import Certificates, make_certificates

pytestmark = pytest.mark.resilience

ADMIN = "resilience-admin-token-1f2e3d4c"
TEAM_A = "resilience-team-a-token-5a6b7c8d"
TEAM_B = "resilience-team-b-token-9e0f1a2b"
TOKENS = {
    ADMIN: {"tenant": "ops", "adapters": ["*"], "routes": ["*"], "admin": True},
    TEAM_A: {"tenant": "team-a", "adapters": ["a-*", "base"], "routes": ["a-*"]},
    TEAM_B: {"tenant": "team-b", "adapters": ["b-*"], "routes": ["b-*"]},
}
A_ADAPTERS, B_ADAPTERS = ("a-one", "a-two"), ("b-one", "b-secret")
ROUTES = {
    "a-route": {"variants": [{"name": "v1", "adapter": "a-one", "weight": 50}, {"name": "v2", "adapter": "a-two", "weight": 50}]},  # noqa: E501
    "b-route": {"variants": [{"name": "only", "adapter": "b-secret", "weight": 100}]},
}  # fmt: skip
DENIED, UNAUTHENTICATED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class Tls:
    certificates: Certificates
    root: Path
    tokens: Path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Tls:
    directory = tmp_path_factory.mktemp("tenancy")
    root = directory / "adapters"
    for seed, adapter_id in enumerate(A_ADAPTERS + B_ADAPTERS):
        write_adapter(root / adapter_id, base_shape, rank=4, layers=[0], seed=40 + seed)
    tokens = directory / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(TOKENS))
    return Tls(make_certificates(directory / "certs"), root, tokens)


def tls_flags(tls: Tls, *, mutual: bool) -> tuple[str, ...]:
    certificates = tls.certificates
    flags: tuple[str, ...] = (
        f"--auth.tokens-file={tls.tokens}",
        f"--server.tls-cert-file={certificates.server_cert}",
        f"--server.tls-key-file={certificates.server_key}",
    )
    if mutual:
        flags += (f"--server.tls-client-ca-file={certificates.ca}", "--server.tls-require-client-cert=true")
    return flags


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[ServerProcess]:
    routes = tmp_path_factory.mktemp("tenancy-routes") / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": ROUTES}))
    log = tmp_path_factory.mktemp("tenancy-server") / "server.log"
    flags = (*tls_flags(tls, mutual=True), f"--routes-file={routes}", "--server.default-max-new-tokens=2")
    with ServerProcess.start(log, [tls.root], *flags) as server:
        yield server
        assert server.stop() == 0, server.log()[-3000:]


def credentials(
    certificates: Certificates, *, client_cert: bool = True, ca: Path | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or certificates.ca).read_bytes(),
        private_key=certificates.client_key.read_bytes() if client_cert else None,
        certificate_chain=certificates.client_cert.read_bytes() if client_cert else None,
    )


@pytest.fixture(scope="module")
def channel(mtls_server: ServerProcess, tls: Tls) -> Iterator[grpc.Channel]:
    with grpc.secure_channel(mtls_server.target, credentials(tls.certificates)) as opened:
        yield opened


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def outcome(call: Callable[..., object], message: object, token: str | None) -> tuple[grpc.StatusCode, str]:
    """The status of ``call(message)`` made with ``token`` (None: no token), streams read to the end."""
    try:
        result = call(message, metadata=bearer(token) if token else (), timeout=60)
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def stream_infer_error(channel: grpc.Channel, model: str, token: str) -> str:
    """The error of one ModelStreamInfer request for ``model`` (an empty string when it succeeded)."""
    infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
    responses = list(infer(iter([infer_request(model)]), metadata=bearer(token), timeout=60))
    return next((r.error_message for r in responses if r.error_message), "")


def infer_request(model: str) -> oip.ModelInferRequest:
    text = oip.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Hello")
    return oip.ModelInferRequest(model_name=model, inputs=[text])


def routed(route: str) -> generation_pb2.GenerateRequest:
    message = request(max_new_tokens=2)
    message.route = route
    return message


def cross_tenant_calls(channel: grpc.Channel) -> list[tuple[str, Callable[..., object], Callable[[str], object]]]:
    """Every non-admin RPC that names an adapter or a route: (what, call, message for that name)."""
    generation = generation_pb2_grpc.GenerationStub(channel)
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    return [
        ("Generate adapter", generation.Generate, lambda name: request(adapter_id=name, max_new_tokens=2)),
        ("GenerateStream adapter", generation.GenerateStream, lambda name: request(adapter_id=name, max_new_tokens=2)),
        ("GetAdapter", adapters.GetAdapter, lambda name: adapters_pb2.GetAdapterRequest(adapter_id=name)),
        ("ModelInfer", inference.ModelInfer, infer_request),
        ("ModelReady", inference.ModelReady, lambda name: oip.ModelReadyRequest(name=name)),
        ("ModelMetadata", inference.ModelMetadata, lambda name: oip.ModelMetadataRequest(name=name)),
    ]


def route_calls(channel: grpc.Channel) -> list[tuple[str, Callable[..., object], Callable[[str], object]]]:
    generation = generation_pb2_grpc.GenerationStub(channel)
    routing = routing_pb2_grpc.RoutingStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    return [
        ("Generate route", generation.Generate, routed),
        ("GenerateStream route", generation.GenerateStream, routed),
        ("GetRouteReport", routing.GetRouteReport, lambda name: routing_pb2.GetRouteReportRequest(route=name)),
        ("ModelInfer route", inference.ModelInfer, infer_request),  # OIP names a model: a route or an adapter
        ("ModelReady route", inference.ModelReady, lambda name: oip.ModelReadyRequest(name=name)),
        ("ModelMetadata route", inference.ModelMetadata, lambda name: oip.ModelMetadataRequest(name=name)),
    ]


def test_a_tenant_cannot_use_another_tenants_adapters_or_routes(channel: grpc.Channel) -> None:
    admin = adapters_pb2_grpc.AdaptersStub(channel)
    for adapter_id in A_ADAPTERS + B_ADAPTERS:
        admin.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id), metadata=bearer(ADMIN), timeout=60)
    checks = 0
    failures: list[str] = []
    for token, own, theirs, own_route, their_route in (
        (TEAM_A, "a-one", B_ADAPTERS, "a-route", "b-route"),
        (TEAM_B, "b-one", A_ADAPTERS, "b-route", "a-route"),
    ):
        for what, call, message in cross_tenant_calls(channel):
            assert outcome(call, message(own), token)[0] == grpc.StatusCode.OK, (what, own)
            for name in (*theirs, "base" if token == TEAM_B else "b-never-existed"):
                code, details = outcome(call, message(name), token)
                checks += 1
                if code != DENIED or not details.endswith(f"may not use adapter '{name}'"):
                    failures.append(f"{what} {name}: {code.name} {details}")
        for what, call, message in route_calls(channel):
            assert outcome(call, message(own_route), token)[0] == grpc.StatusCode.OK, (what, own_route)
            code, details = outcome(call, message(their_route), token)
            ghost = outcome(call, message(f"{their_route}-never-set"), token)  # the same answer: no existence oracle
            checks += 1
            if code != DENIED or (code, details.replace(their_route, "?")) != (
                ghost[0],
                ghost[1].replace(f"{their_route}-never-set", "?"),
            ):
                failures.append(f"{what} {their_route}: {code.name} {details} / {ghost[1]}")
        for name in (*theirs, their_route):
            error = stream_infer_error(channel, name, token)
            checks += 1
            if not error.startswith("PERMISSION_DENIED: "):
                failures.append(f"ModelStreamInfer {name}: {error!r}")
        assert stream_infer_error(channel, own, token) == ""
    # an id inside A's pattern that climbs into B's directory is no id at all
    code, _ = outcome(generation_pb2_grpc.GenerationStub(channel).Generate, request(adapter_id="a-x/../b-one"), TEAM_A)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    figure = f"{checks} cross-tenant uses (generate, stream, OIP, metadata, report): {checks - len(failures)} denied"
    record(7, "tenancy and auth", figure, "no tenant uses another's adapters or routes", not failures)
    assert not failures, failures


def admin_calls(channel: grpc.Channel) -> list[tuple[str, Callable[..., object], object]]:
    """Every admin RPC (its path, the call, a message for it), on the tenant's own adapter or route."""
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    routing = routing_pb2_grpc.RoutingStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    route = routing_pb2.Route(name="a-route", variants=[routing_pb2.Variant(name="v1", adapter_id="a-one", weight=100)])
    header = adapters_pb2.UploadAdapterChunk(header=adapters_pb2.UploadAdapterHeader(adapter_id="a-new"))
    oip_service = "/inference.GRPCInferenceService"
    return [
        ("/loraplex.v1.Adapters/LoadAdapter", adapters.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id="a-one", pin=True)),  # noqa: E501
        ("/loraplex.v1.Adapters/UnloadAdapter", adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id="a-one")),  # noqa: E501
        ("/loraplex.v1.Adapters/UploadAdapter", adapters.UploadAdapter, iter([header])),
        ("/loraplex.v1.Routing/SetRoute", routing.SetRoute, routing_pb2.SetRouteRequest(route=route)),
        ("/loraplex.v1.Routing/DeleteRoute", routing.DeleteRoute, routing_pb2.DeleteRouteRequest(name="a-route")),
        (f"{oip_service}/RepositoryModelLoad", inference.RepositoryModelLoad, oip.RepositoryModelLoadRequest(model_name="a-one")),  # noqa: E501
        (f"{oip_service}/RepositoryModelUnload", inference.RepositoryModelUnload, oip.RepositoryModelUnloadRequest(model_name="a-one")),  # noqa: E501
    ]  # fmt: skip


def test_admin_rpcs_need_the_admin_scope_even_for_a_tenants_own_adapters(channel: grpc.Channel) -> None:
    routing = routing_pb2_grpc.RoutingStub(channel)
    before = routing.ListRoutes(routing_pb2.ListRoutesRequest(), metadata=bearer(ADMIN))
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="a-one"), metadata=bearer(ADMIN), timeout=60)
    refused = 0
    for token, code in ((TEAM_A, DENIED), (TEAM_B, DENIED), (None, UNAUTHENTICATED)):
        for method, call, message in admin_calls(channel):  # fresh messages (the upload's iterator) per token
            got, details = outcome(call, message, token)
            assert got == code, (method, token, got, details)
            assert code != DENIED or details.endswith(f"may not call the admin RPC {method}"), details
            refused += 1
    assert routing.ListRoutes(routing_pb2.ListRoutesRequest(), metadata=bearer(ADMIN)) == before
    one = adapters.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id="a-one"), metadata=bearer(ADMIN))
    assert one.adapter_id == "a-one" and not one.pinned  # neither unloaded nor pinned by the refused calls
    record(7, "tenancy and auth", f"{refused} admin calls without the admin scope or a token: all refused, "
           "nothing changed", "admin RPCs need the admin scope", True)  # fmt: skip


def test_list_and_status_calls_never_show_another_tenants_names(channel: grpc.Channel) -> None:
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    for adapter_id in A_ADAPTERS + B_ADAPTERS:
        adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id), metadata=bearer(ADMIN), timeout=60)
    routing = routing_pb2_grpc.RoutingStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    status = server_pb2_grpc.ServerStub(channel)
    generation = generation_pb2_grpc.GenerationStub(channel)
    b_request = routed("b-route")
    b_request.request_id = "b-private-request"
    generation.Generate(b_request, metadata=bearer(TEAM_B), timeout=60)

    def names(token: str) -> dict[str, set[str]]:
        meta = bearer(token)
        listed = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=meta)
        index = inference.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=meta)
        routes = routing.ListRoutes(routing_pb2.ListRoutesRequest(), metadata=meta)
        raw = b"".join(
            m.SerializeToString()
            for m in (listed, index, routes, status.GetStatus(server_pb2.GetStatusRequest(), metadata=meta))
        )
        other = b"b-" if token == TEAM_A else b"a-"
        assert other not in raw  # not in any field of any response
        return {
            "ListAdapters": {a.adapter_id for a in listed.adapters},
            "RepositoryIndex": {m.name for m in index.models},
            "ListRoutes": {r.name for r in routes.routes},
        }

    assert names(TEAM_A) == {
        "ListAdapters": set(A_ADAPTERS),
        "RepositoryIndex": {"base", *A_ADAPTERS},
        "ListRoutes": {"a-route"},
    }
    assert names(TEAM_B) == {
        "ListAdapters": set(B_ADAPTERS),
        "RepositoryIndex": set(B_ADAPTERS),
        "ListRoutes": {"b-route"},
    }
    feedback = routing_pb2.FeedbackRequest(request_id="b-private-request", label=routing_pb2.FEEDBACK_LABEL_GOOD)
    code, details = outcome(routing.Feedback, feedback, TEAM_A)
    assert code == grpc.StatusCode.NOT_FOUND and "b-route" not in details  # as if it never existed
    record(7, "tenancy and auth", "ListAdapters, RepositoryIndex, ListRoutes, GetStatus, Feedback: 0 names of "
           "another tenant", "no tenant learns another's names", True)  # fmt: skip


def test_mutual_tls_refuses_plaintext_and_clients_without_a_certificate(
    mtls_server: ServerProcess, channel: grpc.Channel, tls: Tls
) -> None:
    live = oip.ServerLiveRequest()
    assert oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(live, metadata=bearer(TEAM_A)).live
    refused = {
        "plaintext": grpc.insecure_channel(mtls_server.target),
        "no client certificate": grpc.secure_channel(
            mtls_server.target, credentials(tls.certificates, client_cert=False)
        ),
        "untrusted server": grpc.secure_channel(
            mtls_server.target, credentials(tls.certificates, ca=tls.certificates.stranger_ca)
        ),
    }
    for what, other in refused.items():
        with other:
            call = oip_grpc.GRPCInferenceServiceStub(other).ServerLive
            assert outcome(call, live, TEAM_A)[0] == grpc.StatusCode.UNAVAILABLE, what


def test_tls_without_client_certificates_serves_tls_and_refuses_plaintext(tmp_path: Path, tls: Tls) -> None:
    flags = tls_flags(tls, mutual=False)
    with ServerProcess.start(tmp_path / "server.log", [tls.root], *flags, wait="listening") as server:
        live = oip.ServerLiveRequest()  # answered while the base model still loads
        with grpc.secure_channel(server.target, credentials(tls.certificates, client_cert=False)) as secure:
            call = oip_grpc.GRPCInferenceServiceStub(secure).ServerLive
            assert call(live, metadata=bearer(TEAM_A), timeout=60).live
            assert outcome(call, live, None)[0] == UNAUTHENTICATED  # TLS is no substitute for a token
        with grpc.insecure_channel(server.target) as plaintext:
            call = oip_grpc.GRPCInferenceServiceStub(plaintext).ServerLive
            assert outcome(call, live, TEAM_A)[0] == grpc.StatusCode.UNAVAILABLE
    record(7, "tenancy and auth", "TLS and mTLS serve; plaintext, no client certificate (mTLS) and an untrusted "
           "server certificate are refused", "TLS/mTLS work, plaintext refused", True)  # fmt: skip
