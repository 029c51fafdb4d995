"""Structured output on the real server, over HTTP (response_format json_schema / json_object and vLLM's
guided_regex, non-streaming and streaming), gRPC (the client's json_schema / regex) and OIP (guided_regex
parameter), on prompts the
unconstrained base answers in prose; an uncompilable spec is a 400 / INVALID_ARGUMENT naming the problem."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest

from loraplex.client import Client
from loraplex.client.errors import InvalidArgumentError
from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.http.conftest import error_of, openai_client, post, start_server
from tests.support.server_process import ServerProcess

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Tell me about Paris."}]
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http_adapter_root: Path) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("http-structured"), http_adapter_root) as process:
        yield process


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target) as client:
        yield client


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_a_json_schema_answer_validates_where_the_free_answer_is_prose(oai: openai.OpenAI) -> None:
    free = oai.chat.completions.create(model="base", messages=MESSAGES, max_tokens=60, temperature=0)  # type: ignore[arg-type]
    assert not _parses(free.choices[0].message.content or "")
    answer = oai.chat.completions.create(
        model="base",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=100,
        temperature=0,
        response_format=JSON_FORMAT,  # type: ignore[arg-type]
    )
    text = answer.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), SCHEMA)
    assert answer.choices[0].finish_reason == "stop"


def test_sampled_rows_and_an_adapter_keep_to_the_schema(oai: openai.OpenAI) -> None:
    for seed, model in [(1, "base"), (2, "alpha"), (3, "beta")]:
        answer = oai.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=100,
            temperature=1.0,
            seed=seed,
            response_format=JSON_FORMAT,  # type: ignore[arg-type]
        )
        jsonschema.validate(json.loads(answer.choices[0].message.content or ""), SCHEMA)


def test_json_object_on_completions_streams_an_object(oai: openai.OpenAI) -> None:
    stream = oai.completions.create(
        model="base",
        prompt="The weather today is",
        max_tokens=100,
        temperature=0,
        stream=True,
        extra_body={"response_format": {"type": "json_object"}},
    )
    chunks = list(stream)
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_guided_regex_output_fullmatches(oai: openai.OpenAI) -> None:
    prompt = "Call me at"
    free = oai.completions.create(model="base", prompt=prompt, max_tokens=20, temperature=0)
    assert not re.fullmatch(PHONE, free.choices[0].text)
    answer = oai.completions.create(
        model="base", prompt=prompt, max_tokens=20, temperature=0, extra_body={"guided_regex": PHONE}
    )
    assert re.fullmatch(PHONE, answer.choices[0].text), answer.choices[0].text
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuch"}}}},
            "Invalid type",
        ),
        ({"guided_regex": "(unclosed"}, "unclosed group"),
        ({"guided_json": "{not json"}, "malformed"),
        ({"response_format": {"type": "yaml"}}, "json_object or json_schema"),
    ],
)
def test_an_uncompilable_constraint_is_a_400_naming_the_problem(
    server: ServerProcess, extra: dict[str, Any], message: str
) -> None:
    response = post(server, "/v1/chat/completions", json={"model": "base", "messages": MESSAGES, **extra})
    assert response.status_code == 400, response.text
    assert message in error_of(response)["message"]


def test_grpc_json_schema_and_regex_streams_keep_to_their_specs(grpc_client: Client) -> None:
    chat = [{"role": "user", "content": "Tell me about Paris."}]
    free = grpc_client.chat(chat, max_new_tokens=60)
    assert not _parses(free.text)
    answer = grpc_client.chat(chat, max_new_tokens=100, json_schema=SCHEMA)
    jsonschema.validate(json.loads(answer.text), SCHEMA)
    assert answer.finish_reason == "stop"
    streamed = "".join(chunk.text for chunk in grpc_client.stream("Call me at", max_new_tokens=20, regex=PHONE))
    assert re.fullmatch(PHONE, streamed), streamed


def test_grpc_uncompilable_schema_is_invalid_argument(grpc_client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="does not compile: Invalid type"):
        grpc_client.generate("hi", json_schema={"type": "nosuch"})


def _oip_infer(server: ServerProcess, **parameters: str) -> oip.ModelInferResponse:
    settings = {name: oip.InferParameter(string_param=value) for name, value in parameters.items()}
    settings["max_tokens"] = oip.InferParameter(int64_param=32)
    prompt = oip.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[b"Call me at"])
    )
    request = oip.ModelInferRequest(
        model_name="base",
        inputs=[prompt],
        parameters=settings,
    )
    with grpc.insecure_channel(server.target) as channel:
        response: oip.ModelInferResponse = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        return response


def test_oip_guided_regex_parameter(server: ServerProcess) -> None:
    response = _oip_infer(server, guided_regex=PHONE)
    text = response.raw_output_contents[0][4:].decode()
    assert re.fullmatch(PHONE, text), text
    with pytest.raises(grpc.RpcError) as failed:
        _oip_infer(server, guided_regex="(unclosed")
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unclosed group" in (
        failed.value.details() or ""
    )
