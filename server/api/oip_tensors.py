"""Open Inference Protocol tensors and parameters ⇄ Python values, and the LLM conventions on top of them.

Input data arrives either in ``raw_input_contents`` (little-endian; BYTES elements as a 4-byte length then the
bytes: what tritonclient sends) or in the typed ``contents`` fields. A request carries one prompt in the BYTES input
``text_input``; sampling settings come as inputs or request parameters of the same names, structured output as one
of vLLM's ``guided_json`` (a JSON schema's text), ``guided_regex`` or ``guided_grammar``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.types import Constraint, ConstraintKind, SamplingParams

_RAW_FORMATS = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP32": "f",
    "FP64": "d",
}
_CONTENT_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
# name → (datatype for metadata, shape for metadata, Python type it converts to)
LLM_INPUTS: dict[str, tuple[str, list[int], type]] = {
    TEXT_INPUT: ("BYTES", [1], str),
    "max_tokens": ("INT32", [1], int),
    "temperature": ("FP32", [1], float),
    "top_p": ("FP32", [1], float),
    "top_k": ("INT32", [1], int),
    "seed": ("UINT64", [1], int),
    "repetition_penalty": ("FP32", [1], float),
    "stop": ("BYTES", [-1], str),
    "stream": ("BOOL", [1], bool),
    "guided_json": ("BYTES", [1], str),
    "guided_regex": ("BYTES", [1], str),
    "guided_grammar": ("BYTES", [1], str),
}
_GUIDED = {
    "guided_json": ConstraintKind.JSON_SCHEMA,
    "guided_regex": ConstraintKind.REGEX,
    "guided_grammar": ConstraintKind.GRAMMAR,
}
# Request parameters stock clients and Triton itself use; accepted and ignored.
IGNORED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"})
IGNORED_PREFIX = "triton_"


def serialize_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the raw layout: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _deserialize_bytes(name: str, raw: bytes) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(f"input '{name}': BYTES element of {length} bytes overruns the raw data")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _elements(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[Any]:
    datatype = tensor.datatype
    if datatype not in _CONTENT_FIELDS:
        raise InvalidRequest(f"input '{tensor.name}': datatype '{datatype}' is not supported here")
    if raw is None:
        return list(getattr(tensor.contents, _CONTENT_FIELDS[datatype]))
    if datatype == "BYTES":
        return list(_deserialize_bytes(tensor.name, raw))
    fmt = "<" + _RAW_FORMATS[datatype]
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise InvalidRequest(f"input '{tensor.name}': {len(raw)} raw bytes are not a whole number of {datatype}")
    return [value for (value,) in struct.iter_unpack(fmt, raw)]


def decode_inputs(request: oip.ModelInferRequest) -> dict[str, list[Any]]:
    """Every input tensor's elements in row-major order, checked against its shape."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input"
        )
    decoded: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        values = _elements(tensor, raw[index] if raw else None)
        expected = math.prod(tensor.shape)
        if any(dim < 0 for dim in tensor.shape) or expected != len(values):
            raise InvalidRequest(
                f"input '{tensor.name}': shape {list(tensor.shape)} does not match its {len(values)} elements"
            )
        if tensor.name in decoded:
            raise InvalidRequest(f"input '{tensor.name}' appears twice")
        decoded[tensor.name] = values
    return decoded


def parameter_value(parameter: oip.InferParameter) -> bool | int | float | str:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidRequest("a request parameter has no value")
    value: bool | int | float | str = getattr(parameter, choice)
    return value


def _as(name: str, kind: type, value: Any) -> Any:
    if isinstance(value, bytes) and kind is str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"'{name}' is not valid UTF-8 text") from exc
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise InvalidRequest(f"'{name}' must be {kind.__name__} (got {type(value).__name__})")


@dataclass(frozen=True)
class LlmRequest:
    prompt: str
    sampling: SamplingParams
    stream: bool | None  # None = not asked


def llm_request(
    inputs: Mapping[str, list[Any]], parameters: Mapping[str, oip.InferParameter], default_max_new_tokens: int
) -> LlmRequest:
    """The prompt, sampling settings and stream flag of a request in the LLM conventions."""
    values: dict[str, list[Any]] = {}
    for name, elements in inputs.items():
        if name not in LLM_INPUTS:
            raise InvalidRequest(f"unknown input '{name}'; the inputs are {sorted(LLM_INPUTS)}")
        values[name] = elements
    for name, parameter in parameters.items():
        if name in IGNORED_PARAMETERS or name.startswith(IGNORED_PREFIX):
            continue
        if name not in LLM_INPUTS or name == TEXT_INPUT:
            raise InvalidRequest(
                f"unknown parameter '{name}'; the parameters are {sorted(set(LLM_INPUTS) - {TEXT_INPUT})}"
            )
        if name in values:
            raise InvalidRequest(f"'{name}' is given both as an input and as a parameter; send it once")
        values[name] = [parameter_value(parameter)]
    if TEXT_INPUT not in values:
        raise InvalidRequest(f"the BYTES input '{TEXT_INPUT}' (the prompt) is missing")
    typed: dict[str, Any] = {}
    for name, elements in values.items():
        kind = LLM_INPUTS[name][2]
        if name == "stop":
            typed[name] = tuple(_as(name, kind, element) for element in elements)
            continue
        if len(elements) != 1:
            raise InvalidRequest(
                f"'{name}' must hold exactly one value (got {len(elements)}); send one prompt per request"
            )
        typed[name] = _as(name, kind, elements[0])
    guided = [Constraint(kind, typed[name]) for name, kind in _GUIDED.items() if name in typed]
    if len(guided) > 1:
        raise InvalidRequest(f"send at most one of {sorted(_GUIDED)}")
    sampling = SamplingParams(
        max_new_tokens=typed.get("max_tokens", default_max_new_tokens),
        temperature=typed.get("temperature", 0.0),
        top_p=typed.get("top_p", 1.0),
        top_k=typed.get("top_k", 0),
        seed=typed.get("seed"),
        repetition_penalty=typed.get("repetition_penalty", 1.0),
        stop=typed.get("stop", ()),
        constraint=guided[0] if guided else None,
    )
    return LlmRequest(prompt=typed[TEXT_INPUT], sampling=sampling, stream=typed.get("stream"))


def text_output(text: str, shape: list[int]) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    """The ``text_output`` tensor (one string of ``shape``) and its raw contents."""
    tensor = oip.ModelInferResponse.InferOutputTensor(name=TEXT_OUTPUT, datatype="BYTES", shape=shape)
    return tensor, serialize_bytes([text.encode("utf-8")])
