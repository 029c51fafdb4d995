"""The Open Inference Protocol through the stock ``tritonclient.grpc`` client, unmodified, in its own process
(see stock_oip_client.py), checked against the server's own loraplex.v1 answers and the protocol's field numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from loraplex.proto.inference import grpc_service_pb2
from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc
from loraplex.server.core.shape import ModelShape
from tests.integration.api.helpers import ADAPTERS, request, run_stock_client
from tests.integration.api.helpers import STOCK_ADAPTER as ADAPTER
from tests.integration.api.helpers import STOCK_EXTRA as EXTRA
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess


@pytest.fixture(scope="module")
def report(server: ServerProcess, adapter_root: Path, base_shape: ModelShape) -> dict[str, Any]:
    write_adapter(adapter_root / EXTRA, base_shape, rank=4, seed=11, strength=3.0)
    return run_stock_client(server.target)


def test_our_messages_carry_the_public_field_numbers(report: dict[str, Any]) -> None:
    ours: dict[str, list[list[Any]]] = {}
    for full_name in report["spec"]:
        message = grpc_service_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        ours[full_name] = [
            [f.number, f.name, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
            for f in message.fields
        ]
    assert ours == report["spec"]


def test_server_and_repository_calls(report: dict[str, Any]) -> None:
    assert (report["live"], report["ready"], report["base_ready"]) == (True, True, True)
    assert report["metadata"]["name"] == "loraplex" and "model_repository" in report["metadata"]["extensions"]
    index = {m["name"]: m for m in report["index_before_load"]["models"]}
    assert index["base"]["state"] == "READY" and index[EXTRA]["state"] == "UNAVAILABLE"
    assert {*ADAPTERS, "too-big", "broken"} <= set(index)
    assert (report["ready_before_load"], report["ready_after_load"], report["ready_after_unload"]) == (
        False,
        True,
        False,
    )
    metadata = report["model_metadata"]
    assert metadata["versions"] == ["1"] and metadata["outputs"][0]["name"] == "text_output"
    assert {"text_input", "max_tokens", "temperature", "top_p", "seed", "stop"} <= {
        i["name"] for i in metadata["inputs"]
    }


def test_model_infer_matches_our_own_generate(
    report: dict[str, Any], generation: generation_pb2_grpc.GenerationStub, channel: grpc.Channel
) -> None:
    adapters_pb2_grpc.AdaptersStub(channel).LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=EXTRA))  # unloaded
    for model, adapter_id in (("base", ""), ("adapter", ADAPTER), ("extra", EXTRA)):
        ours = generation.Generate(request(adapter_id=adapter_id, max_new_tokens=8))
        assert report[model]["text"] == ours.text, model
        assert report[model]["completion_tokens"] == ours.usage.completion_tokens
        assert report[model]["finish_reason"] == ("length" if ours.finish_reason == 2 else "stop")
    assert report["base"]["id"] == "unary-base" and report["base"]["model_version"] == "1"


def test_errors_reach_the_stock_client_with_their_status(report: dict[str, Any]) -> None:
    assert report["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert report["no_text_input"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'text_input' (the prompt) is missing" in report["no_text_input"]["message"]
    assert report["bad_parameter"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "unknown parameter 'beams'" in report["bad_parameter"]["message"]
    assert report["unload_base"]["status"] == "StatusCode.INVALID_ARGUMENT"


def test_decoupled_stream_sends_one_response_per_chunk(
    report: dict[str, Any], generation: generation_pb2_grpc.GenerationStub
) -> None:
    chunks = report["stream"]["chunks"]
    for request_id, adapter_id in (("s-base", ""), ("s-adapter", ADAPTER)):
        ours = list(generation.GenerateStream(request(adapter_id=adapter_id, max_new_tokens=8)))
        *deltas, _ = chunks[request_id]
        assert "".join(c["text"] for c in deltas) == "".join(m.text for m in ours)
        assert len(deltas) == sum(1 for m in ours if m.text)  # one response per non-empty token chunk
        assert [c["final"] for c in chunks[request_id]] == [False] * len(deltas) + [True]
    assert chunks["s-base"][-1]["text"] == ""  # a final response with an empty text_output ...
    assert chunks["s-adapter"][-1]["text"] is None  # ... or none at all, as the client asked
    assert len(report["stream"]["errors"]) == 1 and report["stream"]["errors"][0].startswith("NOT_FOUND: ")
