"""loraplex.v1 Adapters and Server, grpc.health.v1 and server reflection through the generated stubs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import loraplex.server
from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc, server_pb2, server_pb2_grpc
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import CONFIG_FILE
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


def _listed(adapters: adapters_pb2_grpc.AdaptersStub, limit: int = 0) -> adapters_pb2.ListAdaptersResponse:
    return adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(limit=limit))


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
    (listed_after,) = [a for a in _listed(adapters).adapters if a.adapter_id == adapter_id]
    assert (listed_after.tier, listed_after.version) == (adapters_pb2.RESIDENCY_TIER_DISK, 0)  # on disk only


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


def test_list_names_adapters_on_disk_and_in_memory_and_keeps_those_in_memory_when_cut(
    adapters: adapters_pb2_grpc.AdaptersStub, adapter_root: Path, base_shape: ModelShape
) -> None:
    write_adapter(adapter_root / "listing" / "on-disk", base_shape, rank=4, seed=21)
    write_adapter(adapter_root / "listing" / "pinned", base_shape, rank=4, seed=22)
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="listing/pinned", pin=True))
    try:
        full = _listed(adapters)
        ids = [a.adapter_id for a in full.adapters]
        assert ids == sorted(ids) and (full.truncated, full.total) == (False, len(ids))
        assert {*ADAPTERS, "too-big", "broken", "listing/on-disk", "listing/pinned"} <= set(ids)
        by_id = {a.adapter_id: a for a in full.adapters}
        disk = by_id["listing/on-disk"]
        assert (disk.tier, disk.version, disk.rank, disk.pinned) == (adapters_pb2.RESIDENCY_TIER_DISK, 0, 0, False)
        assert not disk.HasField("loaded_at") and not disk.files_changed
        pinned = by_id["listing/pinned"]
        assert pinned.tier in (adapters_pb2.RESIDENCY_TIER_HOST, adapters_pb2.RESIDENCY_TIER_DEVICE)
        assert (pinned.version >= 1, pinned.rank, pinned.pinned, pinned.files_changed) == (True, 4, True, False)

        loaded = sorted(a.adapter_id for a in full.adapters if a.version >= 1)
        cut = _listed(adapters, limit=len(loaded))
        assert [a.adapter_id for a in cut.adapters] == loaded and (cut.truncated, cut.total) == (True, full.total)
        pinned_ids = sorted(a.adapter_id for a in full.adapters if a.pinned)
        assert [a.adapter_id for a in _listed(adapters, limit=len(pinned_ids)).adapters] == pinned_ids
        assert [a.adapter_id for a in _listed(adapters, limit=10**6).adapters] == ids  # the server's cap is higher
    finally:
        adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="listing/pinned", pin=False))


def test_list_and_get_say_when_the_files_changed_since_they_were_read(
    adapters: adapters_pb2_grpc.AdaptersStub, adapter_root: Path, base_shape: ModelShape
) -> None:
    adapter_id = "listing/changing"
    directory = write_adapter(adapter_root / adapter_id, base_shape, rank=4, seed=31)
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id))

    def state() -> tuple[int, bool, bool]:
        (listed,) = [a for a in _listed(adapters).adapters if a.adapter_id == adapter_id]
        shown = adapters.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))
        return listed.version, listed.files_changed, shown.files_changed

    assert state() == (1, False, False)
    os.utime(directory / CONFIG_FILE, ns=(time.time_ns(), time.time_ns() + 10**9))  # same content, new time
    assert state() == (1, True, True)
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id))
    assert state() == (1, False, False)  # read again: the same content keeps its version
    write_adapter(directory, base_shape, rank=4, seed=32)
    assert state() == (1, True, True)
    adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id))
    assert state() == (2, False, False)


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
