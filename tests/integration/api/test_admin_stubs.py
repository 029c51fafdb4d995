"""loraplex.v1 Adapters and Server, grpc.health.v1 and server reflection through the generated stubs."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import loraplex.server
from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc, server_pb2, server_pb2_grpc
from loraplex.server.model.shape import ModelShape
from tests.integration.api.helpers import ADAPTERS, MAX_RANK, request
from tests.support.adapters import write_adapter

SERVICES = ("loraplex.v1.Generation", "loraplex.v1.Adapters", "loraplex.v1.Server", "inference.GRPCInferenceService")


@pytest.fixture(scope="module")
def adapters(channel: grpc.Channel) -> adapters_pb2_grpc.AdaptersStub:
    return adapters_pb2_grpc.AdaptersStub(channel)


def _code(call: object, *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args)  # type: ignore[operator]
    return raised.value.code(), raised.value.details()


def test_load_get_list_pin_and_unload(
    adapters: adapters_pb2_grpc.AdaptersStub,
    generation: generation_pb2_grpc.GenerationStub,
    adapter_root: Path,
    base_shape: ModelShape,
) -> None:
    write_adapter(adapter_root / "admin" / "lifecycle", base_shape, rank=4, targets=("q_proj", "k_proj"), seed=3)
    adapter_id = "admin/lifecycle"
    loaded = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=True))
    assert (loaded.adapter_id, loaded.version, loaded.rank, loaded.pinned) == (adapter_id, 1, 4, True)
    assert list(loaded.target_modules) == ["k_proj", "q_proj"]
    assert loaded.size_bytes > 0 and abs(loaded.loaded_at.ToDatetime().timestamp() - time.time()) < 120
    assert loaded.tier in (adapters_pb2.RESIDENCY_TIER_HOST, adapters_pb2.RESIDENCY_TIER_DEVICE)

    served = generation.Generate(request(adapter_id=adapter_id, max_new_tokens=2))
    assert served.served_by.adapter_version == 1
    shown = adapters.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))
    assert shown.requests_served == 1 and shown.tier == adapters_pb2.RESIDENCY_TIER_DEVICE
    listed = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters
    assert [a.adapter_id for a in listed] == sorted(a.adapter_id for a in listed)
    assert adapter_id in {a.adapter_id for a in listed}

    unpinned = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=False))
    assert (unpinned.version, unpinned.pinned) == (1, False)  # same files: same version

    adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id))
    code, message = _code(generation.Generate, request(adapter_id=adapter_id))
    assert code == grpc.StatusCode.NOT_FOUND and "was unloaded" in message
    assert (
        _code(adapters.GetAdapter, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    code, message = _code(adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id))
    assert code == grpc.StatusCode.NOT_FOUND and "not loaded" in message
    assert adapter_id not in {a.adapter_id for a in adapters.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters}


def test_changed_files_make_a_new_version(
    adapters: adapters_pb2_grpc.AdaptersStub,
    generation: generation_pb2_grpc.GenerationStub,
    adapter_root: Path,
    base_shape: ModelShape,
) -> None:
    directory = write_adapter(adapter_root / "admin" / "versions", base_shape, rank=4, seed=1, strength=3.0)
    first = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="admin/versions"))
    before = generation.Generate(request(adapter_id="admin/versions", max_new_tokens=6, ignore_eos=True))
    write_adapter(directory, base_shape, rank=4, seed=2, strength=3.0)
    second = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="admin/versions"))
    after = generation.Generate(request(adapter_id="admin/versions", max_new_tokens=6, ignore_eos=True))
    assert (first.version, second.version) == (1, 2) and first.content_hash != second.content_hash
    assert (before.served_by.adapter_version, after.served_by.adapter_version) == (1, 2)
    assert list(before.token_ids) != list(after.token_ids)


@pytest.mark.parametrize(
    ("adapter_id", "code", "says"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "adapter_id is empty"),
        ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "is not a name"),
        ("no-such-adapter", grpc.StatusCode.NOT_FOUND, "not found under"),
        ("too-big", grpc.StatusCode.FAILED_PRECONDITION, f"rank {2 * MAX_RANK} exceeds"),
        ("broken", grpc.StatusCode.FAILED_PRECONDITION, "corrupt or truncated"),
    ],
)
def test_load_failures_say_why(
    adapters: adapters_pb2_grpc.AdaptersStub, adapter_id: str, code: grpc.StatusCode, says: str
) -> None:
    got, message = _code(adapters.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id))
    assert got == code and says in message


def test_server_status(channel: grpc.Channel, generation: generation_pb2_grpc.GenerationStub) -> None:
    generation.Generate(request(adapter_id=ADAPTERS[1], max_new_tokens=1))
    status = server_pb2_grpc.ServerStub(channel).GetStatus(server_pb2.GetStatusRequest())
    assert (status.version, status.base_model, status.accepting) == (loraplex.server.__version__, "embedded", True)
    assert status.adapters_on_device >= 1 and 0 <= status.kv_cache_usage < 1


def test_health_is_serving_overall_and_per_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICES):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    code, _ = _code(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_every_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert set(database.get_services()) >= {*SERVICES, "grpc.health.v1.Health"}
    pool = DescriptorPool(database)
    generation = pool.FindServiceByName("loraplex.v1.Generation")
    assert [m.name for m in generation.methods] == ["Generate", "GenerateStream", "Tokenize"]
    inference = pool.FindServiceByName("inference.GRPCInferenceService")
    assert "ModelStreamInfer" in [m.name for m in inference.methods]
    assert pool.FindMessageTypeByName("inference.ModelInferRequest").fields_by_name["raw_input_contents"].number == 7
