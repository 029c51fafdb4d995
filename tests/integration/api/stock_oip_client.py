"""The stock Open Inference Protocol client (``tritonclient.grpc``, unmodified) against a loraplex server.

Runs in its own process: tritonclient registers the ``inference.*`` protobuf messages in the default descriptor
pool, and so does loraplex's generated code, so the two cannot share one process. Prints one JSON report on
stdout for ``test_oip_stock_client.py`` to check:

    python tests/integration/api/stock_oip_client.py HOST:PORT --adapter A --extra-adapter B [--token T]
"""

from __future__ import annotations

import argparse
import json
import queue
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

PROMPT = "Write a short poem about the sea."
SPEC_MESSAGES = (
    "ServerLiveResponse",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelStreamInferResponse",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "RepositoryModelLoadRequest",
    "RepositoryModelUnloadRequest",
)


def spec() -> dict[str, list[list[Any]]]:
    """(full message name) → [number, name, type, repeated, message type] of every field, nested messages too."""
    fields: dict[str, list[list[Any]]] = {}

    def walk(message: Any) -> None:
        fields[message.full_name] = [
            [f.number, f.name, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
            for f in message.fields
        ]
        for nested in message.nested_types:
            walk(nested)

    for name in SPEC_MESSAGES:
        walk(service_pb2.DESCRIPTOR.message_types_by_name[name])
    return fields


def text_input(prompt: str) -> triton.InferInput:
    tensor = triton.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    return tensor


def int_input(name: str, value: int) -> triton.InferInput:
    tensor = triton.InferInput(name, [1], "INT32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
    return tensor


def error_of(call: Any) -> dict[str, str | None]:
    try:
        call()
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return {"status": None, "message": None}


def infer(client: triton.InferenceServerClient, model: str, **options: Any) -> dict[str, Any]:
    result = client.infer(model, [text_input(PROMPT), int_input("max_tokens", 8)], **options)
    response = result.get_response()
    return {
        "text": result.as_numpy("text_output")[0].decode(),
        "model_version": response.model_version,
        "id": response.id,
        "finish_reason": response.parameters["finish_reason"].string_param,
        "completion_tokens": response.parameters["completion_tokens"].int64_param,
    }


def stream(client: triton.InferenceServerClient, adapter: str) -> dict[str, Any]:
    """Three requests on one decoupled stream: base, an adapter (empty final response), an unknown model."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("base", [text_input(PROMPT)], request_id="s-base", parameters={"max_tokens": 8})
    client.async_stream_infer(
        adapter,
        [text_input(PROMPT), int_input("max_tokens", 8)],
        request_id="s-adapter",
        enable_empty_final_response=True,
    )
    client.async_stream_infer("no-such-model", [text_input(PROMPT)], request_id="s-missing")
    chunks: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    finals = 0
    while finals < 3:
        result, error = results.get(timeout=120)
        if error is not None:
            errors.append(error.message())
            finals += 1
            continue
        response = result.get_response()
        output = result.as_numpy("text_output")
        final = response.parameters["triton_final_response"].bool_param
        chunks.setdefault(response.id, []).append(
            {"text": None if output is None else output[0].decode(), "final": final}
        )
        finals += final
    client.stop_stream()
    return {"chunks": chunks, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--adapter", required=True, help="an adapter to infer with")
    parser.add_argument("--extra-adapter", required=True, help="an adapter this script loads and unloads")
    parser.add_argument("--token")
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    client = triton.InferenceServerClient(args.target)
    if headers:  # every call carries the token; the script then only proves that auth works through the stock client
        report = {"live": client.is_server_live(headers=headers), "infer": infer(client, "base", headers=headers)}
        report["no_token"] = error_of(client.is_server_live)
        print(json.dumps(report))
        return
    extra = args.extra_adapter
    report: dict[str, Any] = {
        "spec": spec(),
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "metadata": client.get_server_metadata(as_json=True),
        "ready_before_load": client.is_model_ready(extra),
        "index_before_load": client.get_model_repository_index(as_json=True),
    }
    client.load_model(extra)
    report["ready_after_load"] = client.is_model_ready(extra)
    report["model_metadata"] = client.get_model_metadata(extra, as_json=True)
    report["base_ready"] = client.is_model_ready("base")
    report["base"] = infer(client, "base", request_id="unary-base")
    report["adapter"] = infer(client, args.adapter, parameters={"temperature": 0.0, "top_p": 1.0})
    report["extra"] = infer(client, extra)
    client.unload_model(extra)
    report["ready_after_unload"] = client.is_model_ready(extra)
    report["unknown_model"] = error_of(lambda: client.infer("no-such-model", [text_input(PROMPT)]))
    report["no_text_input"] = error_of(lambda: client.infer("base", [int_input("max_tokens", 4)]))
    report["bad_parameter"] = error_of(lambda: client.infer("base", [text_input(PROMPT)], parameters={"beams": 4}))
    report["unload_base"] = error_of(lambda: client.unload_model("base"))
    report["stream"] = stream(client, args.adapter)
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
