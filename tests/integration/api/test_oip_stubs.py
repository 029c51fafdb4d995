"""The Open Inference Protocol through our generated ``inference`` stubs: typed tensor contents, shapes, the
decoupled stream with several requests, repository calls and every way a request can be wrong."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import pytest

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.proto.v1 import generation_pb2_grpc
from tests.integration.api.helpers import ADAPTERS, MAX_RANK, PROMPT, request, running_requests, wait_until_idle

Tensor = oip.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)


def text_tensor(prompt: str = PROMPT, shape: tuple[int, ...] = (1,)) -> Tensor:
    return Tensor(
        name="text_input",
        datatype="BYTES",
        shape=shape,
        contents=oip.InferTensorContents(bytes_contents=[prompt.encode()]),
    )


def max_tokens(count: int) -> Tensor:
    return Tensor(
        name="max_tokens", datatype="INT32", shape=[1], contents=oip.InferTensorContents(int_contents=[count])
    )


def infer_request(model: str = "base", *tensors: Tensor, **parameters: oip.InferParameter) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name=model, inputs=list(tensors) or [text_tensor(), max_tokens(8)], parameters=parameters
    )


def output_text(response: oip.ModelInferResponse) -> str:
    raw = response.raw_output_contents[0]
    (length,) = struct.unpack_from("<I", raw)
    assert len(raw) == 4 + length
    return raw[4:].decode()


def test_typed_contents_and_shapes(
    inference: oip_grpc.GRPCInferenceServiceStub, generation: generation_pb2_grpc.GenerationStub
) -> None:
    ours = generation.Generate(request(adapter_id=ADAPTERS[2], max_new_tokens=8))
    response = inference.ModelInfer(infer_request(ADAPTERS[2], text_tensor(shape=(1, 1)), max_tokens(8)))
    assert output_text(response) == ours.text
    assert list(response.outputs[0].shape) == [1, 1] and response.outputs[0].datatype == "BYTES"
    assert response.model_version == str(ours.served_by.adapter_version)
    assert response.parameters["completion_tokens"].int64_param == ours.usage.completion_tokens
    as_parameter = inference.ModelInfer(
        infer_request(ADAPTERS[2], text_tensor(), max_tokens=oip.InferParameter(int64_param=8))
    )
    assert output_text(as_parameter) == ours.text


def _stream(
    inference: oip_grpc.GRPCInferenceServiceStub, requests: list[oip.ModelInferRequest]
) -> Iterator[oip.ModelStreamInferResponse]:
    return inference.ModelStreamInfer(iter(requests))


def test_a_stream_runs_its_requests_concurrently_and_keeps_them_apart(
    inference: oip_grpc.GRPCInferenceServiceStub, generation: generation_pb2_grpc.GenerationStub
) -> None:
    requests = [infer_request(a, text_tensor(), max_tokens(6)) for a in ADAPTERS[6:10]]
    for index, message in enumerate(requests):
        message.id = f"r{index}"
    requests.append(infer_request("base", text_tensor(), max_tokens(6), stream=oip.InferParameter(bool_param=False)))
    requests[-1].id = "whole"
    texts: dict[str, str] = {}
    arrival: list[str] = []
    finals: dict[str, int] = {}
    for response in _stream(inference, requests):
        assert not response.error_message
        infer = response.infer_response
        arrival.append(infer.id)
        texts[infer.id] = texts.get(infer.id, "") + output_text(infer)
        finals[infer.id] = finals.get(infer.id, 0) + infer.parameters["triton_final_response"].bool_param
    assert finals == {"r0": 1, "r1": 1, "r2": 1, "r3": 1, "whole": 1}
    for index, adapter_id in enumerate(ADAPTERS[6:10]):
        assert texts[f"r{index}"] == generation.Generate(request(adapter_id=adapter_id, max_new_tokens=6)).text
    assert arrival.count("whole") == 1  # stream=false: one response with the whole text
    assert arrival[: len(requests)] != sorted(arrival[: len(requests)])  # interleaved, not one request after another


BAD_REQUESTS = [
    (oip.ModelInferRequest(inputs=[text_tensor()]), grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty"),
    (infer_request("base", max_tokens(4)), grpc.StatusCode.INVALID_ARGUMENT, "'text_input' (the prompt) is missing"),
    (
        infer_request(
            "base",
            Tensor(
                name="text_input",
                datatype="BYTES",
                shape=[2],
                contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"]),
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one value",
    ),
    (infer_request("base", text_tensor(shape=(3,))), grpc.StatusCode.INVALID_ARGUMENT, "does not match its 1 elements"),
    (
        infer_request(
            "base",
            text_tensor(),
            Tensor(
                name="max_tokens", datatype="FP32", shape=[1], contents=oip.InferTensorContents(fp32_contents=[4.0])
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'max_tokens' must be int",
    ),
    (
        infer_request(
            "base",
            text_tensor(),
            Tensor(name="beams", datatype="INT32", shape=[1], contents=oip.InferTensorContents(int_contents=[4])),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown input 'beams'",
    ),
    (
        infer_request("base", text_tensor(), Tensor(name="x", datatype="FP16", shape=[1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'FP16' is not supported",
    ),
    (
        infer_request("base", text_tensor(), max_tokens(4), max_tokens=oip.InferParameter(int64_param=4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "both as an input and as a parameter",
    ),
    (
        oip.ModelInferRequest(
            model_name="base",
            inputs=[Tensor(name="text_input", datatype="BYTES", shape=[1])],
            raw_input_contents=[b"\x09\x00\x00\x00abc"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "overruns the raw data",
    ),
    (
        oip.ModelInferRequest(model_name="base", inputs=[text_tensor(), max_tokens(3)], raw_input_contents=[b""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    (
        oip.ModelInferRequest(
            model_name="base",
            inputs=[text_tensor()],
            outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown requested outputs ['logits']",
    ),
    (infer_request("base", text_tensor(""), max_tokens(4)), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (infer_request("base", text_tensor(), max_tokens(0)), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be"),
    (infer_request("no-such-model"), grpc.StatusCode.NOT_FOUND, "not found"),
    (
        oip.ModelInferRequest(model_name=ADAPTERS[0], model_version="99", inputs=[text_tensor()]),
        grpc.StatusCode.NOT_FOUND,
        "version 99 is not served",
    ),
    (infer_request("too-big"), grpc.StatusCode.FAILED_PRECONDITION, f"exceeds the server's maximum {MAX_RANK}"),
]


@pytest.mark.parametrize(("message", "code", "says"), BAD_REQUESTS)
def test_bad_infer_requests_say_what_to_fix(
    inference: oip_grpc.GRPCInferenceServiceStub,
    generation: generation_pb2_grpc.GenerationStub,
    message: oip.ModelInferRequest,
    code: grpc.StatusCode,
    says: str,
) -> None:
    generation.Generate(request(adapter_id=ADAPTERS[0], max_new_tokens=1))  # loaded, so its version is known
    with pytest.raises(grpc.RpcError) as raised:
        inference.ModelInfer(message)
    assert raised.value.code() == code and says in raised.value.details()
    (streamed,) = list(_stream(inference, [message]))  # on a stream: an error response, the stream lives on
    assert streamed.error_message == f"{code.name}: {raised.value.details()}"


def test_repository_calls_and_what_they_refuse(inference: oip_grpc.GRPCInferenceServiceStub) -> None:
    index = inference.RepositoryIndex(oip.RepositoryIndexRequest(ready=True))
    assert all(m.state == "READY" for m in index.models) and index.models[0].name == "base"
    inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="base"))  # always loaded: a no-op
    with pytest.raises(grpc.RpcError) as raised:
        inference.RepositoryModelLoad(
            oip.RepositoryModelLoadRequest(
                model_name=ADAPTERS[0], parameters={"config": oip.ModelRepositoryParameter(string_param="{}")}
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'config'" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        inference.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="base"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be unloaded" in raised.value.details()
    metadata = inference.ModelMetadata(oip.ModelMetadataRequest(name="base"))
    assert list(metadata.versions) == ["1"] and metadata.platform == "loraplex"


def test_rpcs_outside_the_subset_are_unimplemented(channel: grpc.Channel) -> None:
    model_config = channel.unary_unary("/inference.GRPCInferenceService/ModelConfig")
    with pytest.raises(grpc.RpcError) as raised:
        model_config(b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancelling_a_decoupled_stream_frees_its_sequences(
    inference: oip_grpc.GRPCInferenceServiceStub, channel: grpc.Channel
) -> None:
    stream = _stream(inference, [infer_request(a, text_tensor(), max_tokens(60)) for a in ADAPTERS[15:17]])
    assert not next(stream).error_message
    assert running_requests(channel) >= 1
    stream.cancel()  # type: ignore[attr-defined]
    assert wait_until_idle(channel) == 0
