"""Open Inference Protocol tensors and parameters: raw and typed contents decode alike, BYTES round-trip, and the
LLM conventions turn them into a prompt and sampling settings, refusing what does not fit with a clear message."""

from __future__ import annotations

import struct

import pytest

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.server.api.oip_tensors import decode_inputs, llm_request, serialize_bytes, text_output
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.types import Constraint, ConstraintKind, SamplingParams

Tensor = oip.ModelInferRequest.InferInputTensor
Contents = oip.InferTensorContents

TYPED_AND_RAW = [
    ("INT32", [3, -7], Contents(int_contents=[3, -7]), struct.pack("<2i", 3, -7)),
    ("INT64", [2**40], Contents(int64_contents=[2**40]), struct.pack("<q", 2**40)),
    ("UINT64", [2**63 + 5], Contents(uint64_contents=[2**63 + 5]), struct.pack("<Q", 2**63 + 5)),
    ("FP32", [0.5, 2.0], Contents(fp32_contents=[0.5, 2.0]), struct.pack("<2f", 0.5, 2.0)),
    ("FP64", [0.1], Contents(fp64_contents=[0.1]), struct.pack("<d", 0.1)),
    ("BOOL", [True, False], Contents(bool_contents=[True, False]), struct.pack("<2?", True, False)),
    ("BYTES", [b"ab", b""], Contents(bytes_contents=[b"ab", b""]), serialize_bytes([b"ab", b""])),
]


@pytest.mark.parametrize(("datatype", "values", "contents", "raw"), TYPED_AND_RAW)
def test_typed_and_raw_contents_decode_to_the_same_values(
    datatype: str, values: list[object], contents: Contents, raw: bytes
) -> None:
    shape = [len(values)]
    typed = oip.ModelInferRequest(inputs=[Tensor(name="x", datatype=datatype, shape=shape, contents=contents)])
    packed = oip.ModelInferRequest(inputs=[Tensor(name="x", datatype=datatype, shape=shape)], raw_input_contents=[raw])
    assert decode_inputs(typed) == decode_inputs(packed) == {"x": values}


def test_bytes_serialize_as_length_prefixed_elements() -> None:
    assert serialize_bytes([b"hi", "é".encode()]) == b"\x02\x00\x00\x00hi\x02\x00\x00\x00\xc3\xa9"
    tensor, raw = text_output("Paris", [1, 1])
    assert (tensor.name, tensor.datatype, list(tensor.shape), raw) == (
        "text_output",
        "BYTES",
        [1, 1],
        b"\x05\x00\x00\x00Paris",
    )


def _llm(inputs: dict[str, list[object]], **parameters: oip.InferParameter) -> SamplingParams:
    return llm_request(inputs, parameters, default_max_new_tokens=16).sampling


def test_inputs_and_parameters_become_sampling_settings() -> None:
    request = llm_request(
        {"text_input": [b"Hello"], "max_tokens": [5], "stop": [b"\n", b"END"], "stream": [False]},
        {"temperature": oip.InferParameter(double_param=0.7), "seed": oip.InferParameter(int64_param=9)},
        default_max_new_tokens=16,
    )
    assert request.prompt == "Hello" and request.stream is False
    assert request.sampling == SamplingParams(max_new_tokens=5, temperature=0.7, seed=9, stop=("\n", "END"))
    assert _llm({"text_input": [b"x"]}) == SamplingParams(max_new_tokens=16)  # the server's default length
    ignored = {
        "priority": oip.InferParameter(uint64_param=1),
        "triton_enable_empty_final_response": oip.InferParameter(),
    }
    assert _llm({"text_input": [b"x"]}, **ignored) == SamplingParams(max_new_tokens=16)


def test_guided_parameters_become_the_constraint() -> None:
    schema = '{"type": "object"}'
    assert _llm({"text_input": [b"x"]}, guided_json=oip.InferParameter(string_param=schema)).constraint == (
        Constraint(ConstraintKind.JSON_SCHEMA, schema)
    )
    assert _llm({"text_input": [b"x"], "guided_regex": [b"a+"]}).constraint == Constraint(ConstraintKind.REGEX, "a+")
    grammar = oip.InferParameter(string_param="start: /b+/")
    assert _llm({"text_input": [b"x"]}, guided_grammar=grammar).constraint == (
        Constraint(ConstraintKind.GRAMMAR, "start: /b+/")
    )


@pytest.mark.parametrize(
    ("inputs", "parameters", "says"),
    [
        ({"max_tokens": [4]}, {}, "'text_input' (the prompt) is missing"),
        ({"text_input": [b"a", b"b"]}, {}, "exactly one value (got 2)"),
        ({"text_input": [b"\xff"]}, {}, "not valid UTF-8"),
        ({"text_input": [b"x"], "max_tokens": [1.5]}, {}, "'max_tokens' must be int (got float)"),
        ({"text_input": [b"x"], "temperature": [True]}, {}, "'temperature' must be float (got bool)"),
        ({"text_input": [b"x"], "beams": [2]}, {}, "unknown input 'beams'"),
        ({"text_input": [b"x"]}, {"beams": oip.InferParameter(int64_param=2)}, "unknown parameter 'beams'"),
        (
            {"text_input": [b"x"]},
            {"text_input": oip.InferParameter(string_param="y")},
            "unknown parameter 'text_input'",
        ),
        ({"text_input": [b"x"], "seed": [1]}, {"seed": oip.InferParameter(int64_param=2)}, "both as an input and"),
        ({"text_input": [b"x"]}, {"seed": oip.InferParameter()}, "has no value"),
        (
            {"text_input": [b"x"], "guided_regex": [b"a"]},
            {"guided_json": oip.InferParameter(string_param="{}")},
            "send at most one of ['guided_grammar', 'guided_json', 'guided_regex']",
        ),
    ],
)
def test_what_does_not_fit_is_refused_with_a_message(
    inputs: dict[str, list[object]], parameters: dict[str, oip.InferParameter], says: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        llm_request(inputs, parameters, default_max_new_tokens=16)
    assert says in str(raised.value)


@pytest.mark.parametrize(
    ("tensor", "raw", "says"),
    [
        (Tensor(name="x", datatype="INT32", shape=[1]), b"\x01\x00\x00", "not a whole number of INT32"),
        (Tensor(name="x", datatype="BYTES", shape=[1]), b"\x01\x00", "truncated BYTES element length"),
        (Tensor(name="x", datatype="INT32", shape=[2]), struct.pack("<i", 1), "shape [2] does not match its 1"),
        (Tensor(name="x", datatype="BF16", shape=[1]), b"\x00\x00", "'BF16' is not supported"),
    ],
)
def test_malformed_tensors_are_refused(tensor: Tensor, raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_inputs(oip.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw]))
    assert says in str(raised.value)
