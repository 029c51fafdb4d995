"""A/B routes on a real server: sticky variants named in responses, shadow traffic that never reaches the caller,
SetRoute/DeleteRoute applied at once and written to the routes file, refusals with the right codes, tenants that see
only their routes, the Open Inference Protocol with a route as the model, and routes that survive a restart."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.proto.v1 import generation_pb2, generation_pb2_grpc, routing_pb2, routing_pb2_grpc
from loraplex.server.api.oip_tensors import serialize_bytes
from tests.integration.routing.conftest import ADMIN, ROUTE, TEAM_A, TEAM_B, bearer, scrape, start
from tests.support.server_process import ServerFailed, ServerProcess

PROMPT = "Route this ticket: my invoice is wrong."


def generate(channel: grpc.Channel, token: str, route: str, user_key: str = "") -> generation_pb2.GenerateResponse:
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(route=route, user_key=user_key, prompt=PROMPT)
    response: generation_pb2.GenerateResponse = stub.Generate(request, metadata=bearer(token))
    return response


def code_of(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)  # type: ignore[operator]
    return raised.value.code(), raised.value.details()


def route_message(name: str, *variants: tuple[str, str, float], shadow: str = "") -> routing_pb2.Route:
    message = routing_pb2.Route(
        name=name, variants=[routing_pb2.Variant(name=n, adapter_id=a, weight=w) for n, a, w in variants]
    )
    if shadow:
        message.shadow.CopyFrom(routing_pb2.Shadow(adapter_id=shadow, percent=100))
    return message


@pytest.fixture(scope="module")
def routing(channel: grpc.Channel) -> routing_pb2_grpc.RoutingStub:
    return routing_pb2_grpc.RoutingStub(channel)


def test_a_user_stays_on_one_variant_and_the_response_names_it(channel: grpc.Channel) -> None:
    seen: Counter[str] = Counter()
    for index in range(10):
        key = f"user-{index}"
        first = generate(channel, TEAM_A, ROUTE, key).served_by
        again = generate(channel, TEAM_A, ROUTE, key).served_by
        assert (first.route, first.variant) == (again.route, again.variant) == (ROUTE, first.variant)
        assert first.adapter_id == {"v1": "ab-v1", "v2": "ab-v2"}[first.variant]
        seen[first.variant] += 1
    assert set(seen) == {"v1", "v2"}


def test_shadow_requests_run_beside_the_caller_and_never_reach_it(
    channel: grpc.Channel, routing: routing_pb2_grpc.RoutingStub, routing_server: ServerProcess
) -> None:
    name = "team-a-mirror"
    route = route_message(name, ("a", "ab-v1", 100), shadow="ab-shadow")
    routing.SetRoute(routing_pb2.SetRouteRequest(route=route), metadata=bearer(ADMIN))
    served = [generate(channel, TEAM_A, name, f"shadow-{i}").served_by.adapter_id for i in range(4)]
    assert served == ["ab-v1"] * 4
    deadline = time.monotonic() + 60
    while _shadow_ok(scrape(routing_server), name) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # the mirrored copies finish on their own, after the callers' answers
    time.sleep(1)
    assert _shadow_ok(scrape(routing_server), name) == 4
    routing.DeleteRoute(routing_pb2.DeleteRouteRequest(name=name), metadata=bearer(ADMIN))


def _shadow_ok(text: str, route: str) -> float:
    labels = {"adapter": "ab-shadow", "route": route, "status": "ok", "variant": "shadow:ab-shadow"}
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "loraplex_requests_total" and s.labels == labels
    )


def test_set_and_delete_apply_at_once_and_rewrite_the_routes_file(
    channel: grpc.Channel, routing: routing_pb2_grpc.RoutingStub, routes_file: Path
) -> None:
    name = "team-a-new"
    created = routing.SetRoute(
        routing_pb2.SetRouteRequest(route=route_message(name, ("a", "ab-v1", 100))), metadata=bearer(ADMIN)
    )
    assert (created.control, created.salt) == ("a", name)
    assert generate(channel, TEAM_A, name, "u1").served_by.adapter_id == "ab-v1"
    changed = route_message(name, ("a", "ab-v1", 25), ("b", "base", 75))
    routing.SetRoute(routing_pb2.SetRouteRequest(route=changed), metadata=bearer(ADMIN))
    stored = yaml.safe_load(routes_file.read_text())["routes"]
    assert set(stored) == {ROUTE, name}
    assert stored[name]["buckets"] == {"a": "0-2499", "b": "2500-9999"}
    variants = Counter(generate(channel, TEAM_A, name, f"k{i}").served_by.variant for i in range(12))
    assert set(variants) <= {"a", "b"} and variants["b"] > 0
    routing.DeleteRoute(routing_pb2.DeleteRouteRequest(name=name), metadata=bearer(ADMIN))
    assert set(yaml.safe_load(routes_file.read_text())["routes"]) == {ROUTE}
    code, message = code_of(generate, channel, TEAM_A, name)
    assert code == grpc.StatusCode.NOT_FOUND and f"unknown route '{name}'" in message


@pytest.mark.parametrize(
    ("token", "route", "code", "says"),
    [
        (ADMIN, route_message("team-a-x", ("a", "ab-v1", 60), ("b", "ab-v2", 30)), "INVALID_ARGUMENT", "sum to 100"),
        (ADMIN, route_message("team-a-x", ("a", "nope", 100)), "NOT_FOUND", "route 'team-a-x', a: adapter 'nope'"),
        (ADMIN, route_message("team-a-x", ("a", "ab-v1", 100), shadow="gone"), "NOT_FOUND", "shadow: adapter 'gone'"),
        (ADMIN, route_message("bad name", ("a", "ab-v1", 100)), "INVALID_ARGUMENT", "route name 'bad name'"),
        (ADMIN, route_message("team-a-x", ("a", "", 100)), "INVALID_ARGUMENT", "adapter"),
        (TEAM_A, route_message("team-a-x", ("a", "ab-v1", 100)), "PERMISSION_DENIED", "admin RPC"),
    ],
)
def test_bad_routes_are_refused_when_set(
    routing: routing_pb2_grpc.RoutingStub, token: str, route: routing_pb2.Route, code: str, says: str
) -> None:
    got, message = code_of(routing.SetRoute, routing_pb2.SetRouteRequest(route=route), metadata=bearer(token))
    assert got.name == code and says in message, message
    assert "team-a-x" not in [
        r.name for r in routing.ListRoutes(routing_pb2.ListRoutesRequest(), metadata=bearer(ADMIN)).routes
    ]


def test_tenants_see_and_use_only_their_routes(channel: grpc.Channel, routing: routing_pb2_grpc.RoutingStub) -> None:
    listed = routing.ListRoutes(routing_pb2.ListRoutesRequest(), metadata=bearer(TEAM_A)).routes
    assert [r.name for r in listed] == [ROUTE] and listed[0].shadow.adapter_id == "ab-shadow"
    assert list(routing.ListRoutes(routing_pb2.ListRoutesRequest(), metadata=bearer(TEAM_B)).routes) == []
    assert code_of(generate, channel, TEAM_B, ROUTE)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(generate, channel, TEAM_B, "team-b-none")[0] == grpc.StatusCode.NOT_FOUND
    report = routing_pb2.GetRouteReportRequest(route=ROUTE)
    assert code_of(routing.GetRouteReport, report, metadata=bearer(TEAM_B))[0] == grpc.StatusCode.PERMISSION_DENIED
    delete = routing_pb2.DeleteRouteRequest(name=ROUTE)
    assert code_of(routing.DeleteRoute, delete, metadata=bearer(TEAM_A))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(routing.DeleteRoute, routing_pb2.DeleteRouteRequest(name="zz"), metadata=bearer(ADMIN))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


def test_feedback_is_counted_once_per_routed_request(
    channel: grpc.Channel, routing: routing_pb2_grpc.RoutingStub
) -> None:
    response = generate(channel, TEAM_A, ROUTE, "feedback-user")
    before = {
        v.name: v
        for v in routing.GetRouteReport(
            routing_pb2.GetRouteReportRequest(route=ROUTE), metadata=bearer(TEAM_A)
        ).variants
    }
    feedback = routing_pb2.FeedbackRequest(
        request_id=response.request_id, label=routing_pb2.FEEDBACK_LABEL_GOOD, score=4
    )
    counted = routing.Feedback(feedback, metadata=bearer(TEAM_A))
    assert (counted.route, counted.variant) == (ROUTE, response.served_by.variant)
    after = {
        v.name: v
        for v in routing.GetRouteReport(
            routing_pb2.GetRouteReportRequest(route=ROUTE), metadata=bearer(TEAM_A)
        ).variants
    }
    variant = response.served_by.variant
    assert after[variant].positives == before[variant].positives + 1
    assert after[variant].scored == before[variant].scored + 1
    assert code_of(routing.Feedback, feedback, metadata=bearer(TEAM_A))[0] == grpc.StatusCode.ALREADY_EXISTS
    code, message = code_of(routing.Feedback, feedback, metadata=bearer(TEAM_B))  # another tenant's: as unknown
    assert code == grpc.StatusCode.NOT_FOUND and ROUTE not in message
    unknown = routing_pb2.FeedbackRequest(request_id="never-served", label=routing_pb2.FEEDBACK_LABEL_BAD)
    code, message = code_of(routing.Feedback, unknown, metadata=bearer(TEAM_A))
    assert code == grpc.StatusCode.NOT_FOUND and "routing.feedback_retention" in message
    other = generate(channel, TEAM_A, ROUTE, "feedback-user-2")
    empty = routing_pb2.FeedbackRequest(request_id=other.request_id)
    code, message = code_of(routing.Feedback, empty, metadata=bearer(TEAM_A))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "label" in message


def test_a_route_is_an_open_inference_protocol_model(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = oip.ModelInferRequest(model_name=ROUTE)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(serialize_bytes([PROMPT.encode()]))
    request.parameters["user_key"].string_param = "oip-user"
    request.parameters["max_tokens"].int64_param = 3
    first = stub.ModelInfer(request, metadata=bearer(TEAM_A))
    again = stub.ModelInfer(request, metadata=bearer(TEAM_A))
    assert first.parameters["route"].string_param == ROUTE
    assert first.parameters["variant"].string_param == again.parameters["variant"].string_param in ("v1", "v2")
    ready = stub.ModelReady(oip.ModelReadyRequest(name=ROUTE), metadata=bearer(TEAM_A))
    assert ready.ready
    request.parameters["user_key"].int64_param = 7
    code, message = code_of(stub.ModelInfer, request, metadata=bearer(TEAM_A))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'user_key' (a route's sticky key) must be a string" in message
    load = oip.RepositoryModelLoadRequest(model_name=ROUTE)
    code, message = code_of(stub.RepositoryModelLoad, load, metadata=bearer(ADMIN))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is an A/B route" in message


def test_routes_and_users_survive_a_restart(
    tmp_path: Path,
    channel: grpc.Channel,
    routing: routing_pb2_grpc.RoutingStub,
    routing_root: Path,
    routes_file: Path,
) -> None:
    name = "team-a-restart"
    for weights in ((34.0, 33.0, 33.0), (50.0, 25.0, 25.0)):  # the second moves users: buckets are state
        route = route_message(name, *zip(("a", "b", "c"), ("ab-v1", "ab-v2", "base"), weights, strict=True))
        routing.SetRoute(routing_pb2.SetRouteRequest(route=route), metadata=bearer(ADMIN))
    keys = [f"restart-{i}" for i in range(10)]
    before = [generate(channel, ADMIN, name, key).served_by.variant for key in keys]
    with start(tmp_path, routing_root, routes_file) as second, grpc.insecure_channel(second.target) as other:
        listed = routing_pb2_grpc.RoutingStub(other).ListRoutes(routing_pb2.ListRoutesRequest(), metadata=bearer(ADMIN))
        assert name in [r.name for r in listed.routes]
        after = [generate(other, ADMIN, name, key).served_by.variant for key in keys]
        assert second.stop() == 0
    assert after == before and len(set(before)) > 1


@pytest.mark.parametrize(
    ("routes", "says"),
    [
        ("routes: [", "is not valid YAML"),
        ("routes: {r: {variants: [{name: a, adapter: ab-v1, weight: 90}]}}", "variant weights must sum to 100"),
        ("routes: {r: {variants: [{name: a, adapter: missing, weight: 100}]}}", "adapter 'missing' not found"),
    ],
)
def test_a_bad_routes_file_stops_the_start_with_what_to_fix(
    tmp_path: Path, routing_root: Path, routes: str, says: str
) -> None:
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(routes)
    with pytest.raises(ServerFailed) as failed:
        start(tmp_path, routing_root, routes_file)
    assert "exited with 2" in str(failed.value) and "cannot start: routes file" in str(failed.value)
    assert says in str(failed.value)
