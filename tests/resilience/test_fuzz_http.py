"""Resilience scenario 3, fuzzing, over the OpenAI-compatible HTTP API: generated requests against every route the
server serves, on a real server with auth on: no 5xx, every error is OpenAI's error JSON, every 200 is well formed
(an SSE stream ends with ``data: [DONE]``), no traceback in the log, and afterwards the server answers a greedy
completion token for token as it did before.

Bodies come from ``tests/support/json_strategies.py``: each route's valid request, then a field or two replaced by
wrong types, out-of-range or non-finite numbers, huge strings or nested junk, fields dropped, unknown fields added;
structured output with junk schemas, regexes and grammars; the bytes as JSON, cut, with invalid UTF-8, random or
empty, under any Content-Type; bearer tokens right (admin or tenant), wrong, malformed or absent. Unknown paths and
wrong methods too, and malformed HTTP over raw sockets. Requests go out 32 at a time. The server's limits are small
(2 new tokens, 32 prompt tokens, 64 KiB bodies), so accepted requests generate cheaply; they still go through the
engine. ``/openapi.json`` lists the routes the app serves: the test fails when one is not fuzzed here.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from loraplex.server.core.shape import ModelShape
from tests.support.adapters import write_adapter
from tests.support.json_strategies import BodySpec, bodies, encoded, junk
from tests.support.resilience import full_run, fuzz_settings, record
from tests.support.server_process import ServerProcess, stopping_cleanly

pytestmark = pytest.mark.resilience

MAX_NEW_TOKENS = 2
MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 2000
SERVER_FLAGS = (
    "--adapters.max-rank=8",
    f"--engine.max-new-tokens={MAX_NEW_TOKENS}",
    "--server.default-max-new-tokens=1",
    "--engine.max-prompt-tokens=96",  # a chat template adds a system prompt of about 30
    "--engine.max-seq-len=128",
    f"--server.max-prompt-chars={MAX_PROMPT_CHARS}",
    "--engine.max-running=64",
    "--engine.max-queue=2048",
    f"--server.max-message-bytes={MAX_BODY_BYTES}",
)
ADMIN = "fuzz-admin-token-3c4d5e6f7a8b"
TENANT = "fuzz-tenant-token-9a8b7c6d5e4f"  # the base, "good" and the route; no admin scope
TOKENS = {
    ADMIN: {"tenant": "ops", "adapters": ["*"], "routes": ["*"], "admin": True},
    TENANT: {"tenant": "team", "adapters": ["good", "base"], "routes": ["fuzz-route"]},
}
ROUTE = "fuzz-route"
PROMPT = "The capital of France is"
WORKERS = 32
TIMEOUT_S = 120.0
# Names the server knows, mixed into junk so fuzzed requests get past the first checks.
INTERESTING = (
    "", "base", "good", "good2", "too-big", "broken", "missing", ROUTE, "a/b", "../good", "/etc/passwd",
    "~no-such-user/good", "good\x00", "\ud800", "user", "system", "assistant", "tool", "developer", "text",
    "json_object", "json_schema", "schema", "type", "string", "object", "Hello", PROMPT,
)  # fmt: skip
HUGE = (MAX_PROMPT_CHARS + 1, 30_000, MAX_BODY_BYTES + 1)  # over the prompt limit; under and over the body limit

GENERATE = frozenset({200, 400, 401, 403, 404, 413, 429})
ROUTES: dict[tuple[str, str], frozenset[int]] = {  # every route the app serves, with the statuses it may answer
    ("POST", "/v1/completions"): GENERATE,
    ("POST", "/v1/chat/completions"): GENERATE,
    ("GET", "/v1/models"): frozenset({200, 401}),
    ("POST", "/v1/load_lora_adapter"): frozenset({200, 400, 401, 403, 404, 409, 413}),
    ("POST", "/v1/unload_lora_adapter"): frozenset({200, 400, 401, 403, 404, 413}),
    ("GET", "/health"): frozenset({200}),
    ("GET", "/ready"): frozenset({200}),
    ("GET", "/openapi.json"): frozenset({200}),
}
UNKNOWN, WRONG_METHOD, RAW = "unknown path", "wrong method", "raw HTTP"
UNKNOWN_STATUSES = frozenset({307, 404})  # 307: Starlette's redirect of a trailing slash to the served path
UNKNOWN_PATHS = (
    "/", "/v1", "/v1/", "/v1/embeddings", "/v2/models", "/v1/completions/", "/v1/models/base", "/docs", "/redoc",
    "/metrics", "/%ff", "/%00", "/v1/%2e%2e/health", "/" + "a" * 4000, "/v1/chat/completions%20",
)  # fmt: skip
OTHER_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


@dataclass(frozen=True)
class Case:
    kind: tuple[str, str] | str  # a served route, or UNKNOWN / WRONG_METHOD
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: int | None  # None: the server closed the connection without an answer (raw HTTP only)
    content_type: str
    body: bytes


# ------------------------------------------------------------------------------------------------ strategies

SCHEMA_WORDS = (
    "type", "properties", "required", "items", "enum", "const", "minLength", "maxLength", "pattern", "anyOf",
    "oneOf", "allOf", "not", "$ref", "$defs", "additionalProperties", "minimum", "maximum", "minItems", "maxItems",
    "format", "x-guidance",
)  # fmt: skip
GOOD_SCHEMAS = (
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}, "required": ["answer"]},
    {"type": "array", "items": {"type": "integer"}},
    {"enum": ["yes", "no"]},
    {"type": "string", "pattern": "^[a-z]+$"},
    True,
    {},
)
REGEXES = ("[a-z]+", "\\d{1,3}", "(yes|no)", "(", "[", "a{2,1}", ".*", "\\p{Lu}\\w*", "a{100000}", "(?P<x>a)\\1", "")
GRAMMARS = ('start: "yes" | "no"', 'root ::= "a" | "b"', "start: x", "::=", "%import common.WORD\nstart: WORD", "")
ROLES = ("user", "user", "user", "system", "assistant", "tool", "developer", "function", "", "USER")


def schemas(junk_values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    leaves = st.sampled_from(GOOD_SCHEMAS) | st.sampled_from(("string", "object", "integer", "nope")) | junk_values
    return st.recursive(
        leaves,
        lambda inner: st.dictionaries(st.sampled_from(SCHEMA_WORDS), inner, max_size=4) | st.lists(inner, max_size=3),
        max_leaves=8,
    )


def response_formats(schema: st.SearchStrategy[Any], junk_values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    typed = st.builds(lambda name, value: {"name": name, "schema": value}, st.text(max_size=8), schema)
    return st.one_of(
        st.sampled_from(({"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "grammar"})),
        st.builds(lambda spec: {"type": "json_schema", "json_schema": spec}, typed | junk_values),
    )


def generation_fields(models: list[str], junk_values: st.SearchStrategy[Any]) -> dict[str, st.SearchStrategy[Any]]:
    schema = schemas(junk_values)
    return {
        "model": st.sampled_from(models),
        "max_tokens": st.sampled_from((1, 2, 2, 2, 0, MAX_NEW_TOKENS + 1)),
        "temperature": st.sampled_from((0, 0.7, 1.0, 2.0)),
        "top_p": st.sampled_from((0.5, 1.0)),
        "top_k": st.integers(0, 50),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.sampled_from(("\n", ".", ["\n", "."], [])),
        "repetition_penalty": st.sampled_from((0.9, 1.0, 1.3)),
        "ignore_eos": st.booleans(),
        "presence_penalty": st.sampled_from((0, 0, 0, 0.5)),
        "frequency_penalty": st.just(0),
        "logit_bias": st.sampled_from(({}, {}, {}, {"11": 1.0})),
        "n": st.sampled_from((1, 1, 1, 2)),
        "stream": st.booleans(),
        "stream_options": st.builds(lambda usage: {"include_usage": usage}, st.booleans()),
        "user": st.text(max_size=12),
        "cache_salt": st.text(max_size=12),
        "response_format": response_formats(schema, junk_values),
        "guided_json": schema | st.sampled_from(('{"type": "string"}', "{", "[]")),
        "guided_regex": st.sampled_from(REGEXES),
        "guided_grammar": st.sampled_from(GRAMMARS),
    }


def body_specs(models: list[str], junk_values: st.SearchStrategy[Any]) -> dict[tuple[str, str], BodySpec]:
    sampling = generation_fields(models, junk_values)
    prompts = st.sampled_from(("Hello", PROMPT)) | st.text(max_size=40) | st.lists(st.integers(0, 1000), max_size=8)
    part = st.builds(lambda kind, text: {"type": kind, "text": text}, st.sampled_from(("text", "image_url")), prompts)
    message = st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(ROLES),
        st.sampled_from(("Hello", PROMPT)) | prompts | st.lists(part, max_size=3) | st.none(),
    )
    names = st.sampled_from(("good", "good", "good2", "too-big", "broken", "missing")) | st.text(max_size=20)
    paths = st.sampled_from(("good", "good2", "/etc", "~no-such-user/good", "good\x00", "../good", "", "good/../good"))
    return {
        ("POST", "/v1/completions"): BodySpec(
            {
                **sampling,
                "prompt": prompts | st.just(["Hello", "Hi"]),
                "logprobs": st.sampled_from((0, 0, 0, 2)),
                "echo": st.sampled_from((False, False, False, True)),
                "suffix": st.sampled_from(("", "", "", "!")),
                "best_of": st.sampled_from((1, 1, 1, 2)),
            },
            frozenset({"model", "prompt"}),
        ),
        ("POST", "/v1/chat/completions"): BodySpec(
            {
                **sampling,
                "messages": st.lists(message, min_size=1, max_size=3),
                "max_completion_tokens": st.sampled_from((1, 2, 2, 2, 0, MAX_NEW_TOKENS + 1)),
                "logprobs": st.booleans(),
                "top_logprobs": st.sampled_from((0, 0, 0, 3)),
                "tools": st.sampled_from(([], [], [], [{"type": "function"}])),
                "tool_choice": st.sampled_from(("auto", "none")),
            },
            frozenset({"model", "messages"}),
        ),
        ("POST", "/v1/load_lora_adapter"): BodySpec(
            {"lora_name": names, "lora_path": paths, "load_inplace": st.booleans(), "pin": st.booleans()},
            frozenset({"lora_name", "lora_path"}),  # vLLM requires both
        ),
        ("POST", "/v1/unload_lora_adapter"): BodySpec(
            {"lora_name": st.sampled_from(("good", "good2")) | names, "lora_int_id": st.integers()},
            frozenset({"lora_name"}),
        ),
    }


AUTHORIZATION = (  # None: no header
    *[f"Bearer {ADMIN}"] * 12, *[f"Bearer {TENANT}"] * 4, None,
    "Bearer wrong-token-of-some-length", f"Basic {ADMIN}", "Bearer", "bearer", f"Bearer {ADMIN} extra",
)  # fmt: skip
CONTENT_TYPES = (
    "application/json", "application/json", "application/json; charset=utf-8", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", None,
)  # fmt: skip


@st.composite
def cases(draw: st.DrawFn, specs: dict[tuple[str, str], BodySpec], junk_values: st.SearchStrategy[Any]) -> Case:
    headers = [("authorization", a)] if (a := draw(st.sampled_from(AUTHORIZATION))) is not None else []
    if (content_type := draw(st.sampled_from(CONTENT_TYPES))) is not None:
        headers.append(("content-type", content_type))
    choice = draw(st.integers(0, 19))
    if choice == 0:  # a path the app does not serve
        text = st.text(st.characters(codec="utf-8"), max_size=30).map(lambda t: "/" + quote(t))
        path = draw(st.sampled_from(UNKNOWN_PATHS) | text)
        return Case(UNKNOWN, draw(st.sampled_from(OTHER_METHODS)), path, tuple(headers), b"")
    if choice == 1:  # a served path with a method it does not take
        method, path = draw(st.sampled_from(sorted(ROUTES)))
        other = draw(st.sampled_from([m for m in OTHER_METHODS if m != method]))
        return Case(WRONG_METHOD, other, path, tuple(headers), draw(st.binary(max_size=16)))
    if choice <= 3:
        route = draw(st.sampled_from([key for key in sorted(ROUTES) if key not in specs]))
        return Case(route, *route, tuple(headers), b"")
    route = draw(st.sampled_from(sorted(specs)))
    body = draw(encoded(draw(bodies(specs[route], junk_values))))
    return Case(route, *route, tuple(headers), body)


def draw_cases(examples: int, models: list[str]) -> list[Case]:
    junk_values = junk(INTERESTING, HUGE)
    specs = body_specs(models, junk_values)
    drawn: list[Case] = []

    @fuzz_settings(examples)
    @given(cases(specs, junk_values))
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


# ----------------------------------------------------------------------------------------------- raw HTTP

_VALID = b'{"model": "base", "prompt": "Hello", "max_tokens": 1}'
RAW_REQUESTS = (
    b"GARBAGE\r\n\r\n",
    b"\r\n\r\n",
    b"GET /health HTTP/1.0\r\n\r\n",
    b"GET /health HTTP/9.9\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + _VALID,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + _VALID,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n" + _VALID,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + _VALID,  # the rest never comes
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + _VALID,
    b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"mo\r\n0\r\n\r\n',
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n" + _VALID,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
)
RAW_RANDOM = 40
RAW_WAIT_S = 3.0


def raw_requests(rng: random.Random) -> list[bytes]:
    """The fixed malformed requests, random bytes, and a valid request with bytes flipped."""
    valid = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(_VALID), _VALID)
    flipped = []
    for _ in range(RAW_RANDOM):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        flipped.append(bytes(data))
    return [*RAW_REQUESTS, *(rng.randbytes(rng.choice((1, 8, 64, 600))) for _ in range(RAW_RANDOM)), *flipped]


def send_raw(port: int, data: bytes) -> Outcome:
    """Writes ``data`` and reads the answer's head; status None when the server closed the connection, reset it or
    said nothing within RAW_WAIT_S (a body it still waits for)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_WAIT_S) as sock:
        try:
            sock.sendall(data)
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        except OSError:  # reset, or nothing more within the wait (TimeoutError is an OSError)
            pass
    status_line = answer.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None
    return Outcome(Case(RAW, "", "", (), data), status, "", answer)


# ------------------------------------------------------------------------------------------------- checking


def send(client: httpx.Client, case: Case) -> Outcome:
    try:
        response = client.request(case.method, case.path, content=case.body, headers=list(case.headers))
    except httpx.TransportError as error:  # no answer at all: a rule broken (see problem_of)
        return Outcome(case, None, "", repr(error).encode())
    return Outcome(case, response.status_code, response.headers.get("content-type", ""), response.content)


def error_problem(body: Any) -> str | None:
    """What is wrong with an OpenAI error body (None: nothing)."""
    error = body.get("error") if isinstance(body, dict) and set(body) == {"error"} else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error JSON: {str(body)[:300]}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"an error without a message or type: {error}"
    return None


_OBJECTS = {"/v1/completions": ("text_completion", "text_completion"), "/v1/chat/completions": ("chat.completion", "chat.completion.chunk")}  # fmt: skip  # noqa: E501


def generation_problem(path: str, outcome: Outcome) -> str | None:
    whole, chunk = _OBJECTS[path]
    if outcome.content_type.startswith("text/event-stream"):
        events = outcome.body.decode().split("\n\n")
        if events[-2:] != ["data: [DONE]", ""] or not all(e.startswith("data: ") for e in events[:-1]):
            return f"a stream that does not end with data: [DONE]: {outcome.body[-300:]!r}"
        for item in (json.loads(e.removeprefix("data: ")) for e in events[:-2]):
            if "error" in item:
                problem = error_problem(item)
                if problem or item["error"]["type"] == "server_error":
                    return f"an error in the stream: {problem or item}"
            elif item.get("object") != chunk or not isinstance(item.get("choices"), list):
                return f"a malformed chunk: {item}"
        return None
    body = json.loads(outcome.body)
    choices = body.get("choices") or [{}]
    usage = body.get("usage") or {}
    if body.get("object") != whole or len(choices) != 1 or choices[0].get("finish_reason") not in ("stop", "length"):
        return f"a malformed answer: {body}"
    if not 1 <= usage.get("completion_tokens", 0) <= MAX_NEW_TOKENS:
        return f"an answer with a wrong usage: {usage}"
    return None


_OK_BODIES = {  # route -> (key, value) a 200 body must hold
    "/v1/models": ("object", "list"),
    "/v1/load_lora_adapter": ("object", "lora_adapter"),
    "/v1/unload_lora_adapter": ("object", "lora_adapter"),
    "/health": ("status", "ok"),
    "/ready": ("ready", True),
}


def problem_of(outcome: Outcome) -> str | None:
    """Why ``outcome`` breaks the rules (None: it keeps them), or that its body could not be read."""
    try:
        return _problem(outcome)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, not UTF-8, not the shape
        return f"an unreadable answer ({error!r}): {outcome.body[:300]!r}"


def _problem(outcome: Outcome) -> str | None:
    case, status = outcome.case, outcome.status
    if case.kind == RAW:
        return None if status is None or status < 500 else f"status {status}"
    allowed = ROUTES[case.kind] if isinstance(case.kind, tuple) else UNKNOWN_STATUSES
    if case.kind == WRONG_METHOD:
        allowed = frozenset({405})
    if status not in allowed:
        return f"status {status}, not one of {sorted(allowed)}: {outcome.body[:300]!r}"
    if case.method == "HEAD" or 300 <= status < 400:
        return None  # no body
    if not outcome.content_type.startswith("application/json") and status != 200:
        return f"an error of Content-Type {outcome.content_type!r}: {outcome.body[:300]!r}"
    if status != 200:
        return error_problem(json.loads(outcome.body))
    if case.path in _OBJECTS:
        return generation_problem(case.path, outcome)
    body = json.loads(outcome.body)
    if case.path == "/openapi.json":
        return None if isinstance(body.get("paths"), dict) else f"an OpenAPI document without paths: {body}"
    key, value = _OK_BODIES[case.path]
    return None if body.get(key) == value else f"a 200 without {key}={value!r}: {str(body)[:300]}"


# ---------------------------------------------------------------------------------------------------- test


@pytest.fixture(scope="module")
def fuzz_http_server(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz-http-adapters")
    for index, adapter_id in enumerate(("good", "good2")):
        write_adapter(root / adapter_id, base_shape, rank=4, layers=[0], seed=40 + index)
    write_adapter(root / "too-big", base_shape, rank=16, layers=[0], seed=42)
    (write_adapter(root / "broken", base_shape, rank=4, layers=[0], seed=43) / "adapter_model.safetensors").write_bytes(
        b"\x00" * 12
    )
    directory = tmp_path_factory.mktemp("fuzz-http-server")
    routes, tokens = directory / "routes.yaml", directory / "tokens.yaml"
    variants = [{"name": "v1", "adapter": "good", "weight": 50}, {"name": "v2", "adapter": "base", "weight": 50}]
    routes.write_text(yaml.safe_dump({"routes": {ROUTE: {"variants": variants}}}))
    tokens.write_text(yaml.safe_dump(TOKENS))
    flags = (*SERVER_FLAGS, f"--routes-file={routes}", f"--auth.tokens-file={tokens}")
    with stopping_cleanly(ServerProcess.start(directory / "server.log", [root], *flags)) as server:
        yield server


def greedy_answers(client: httpx.Client) -> list[tuple[str, list[str], int]]:
    """The base's and "good"'s greedy completion of PROMPT: text, tokens and completion token count."""
    answers = []
    for model in ("base", "good"):
        body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_NEW_TOKENS, "temperature": 0, "logprobs": 0}
        response = client.post("/v1/completions", json={**body, "ignore_eos": True})
        assert response.status_code == 200, response.text
        answer = response.json()
        choice = answer["choices"][0]
        answers.append((choice["text"], choice["logprobs"]["tokens"], answer["usage"]["completion_tokens"]))
    return answers


def test_fuzzed_http_requests_get_no_5xx_and_openai_errors_and_the_server_keeps_serving(
    fuzz_http_server: ServerProcess,
) -> None:
    examples = 10_000 if full_run() else 1_500
    url, limits = fuzz_http_server.http_url, httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
    with (
        httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=TIMEOUT_S) as admin,
        httpx.Client(base_url=url, timeout=TIMEOUT_S, limits=limits) as client,
    ):
        served = admin.get("/openapi.json").json()["paths"]
        base_name = admin.get("/v1/models").json()["data"][0]["root"]
        before = greedy_answers(admin)
        started = time.monotonic()
        drawn = draw_cases(examples, ["base", "good", "good2", ROUTE, "missing", "too-big", "broken", base_name])
        raw = raw_requests(random.Random(11))
        with ThreadPoolExecutor(WORKERS) as pool:
            outcomes = list(pool.map(lambda case: send(client, case), drawn))
            outcomes += pool.map(lambda data: send_raw(fuzz_http_server.http_port, data), raw)
        elapsed = time.monotonic() - started
        assert fuzz_http_server.process.poll() is None, fuzz_http_server.log()[-3000:]
        assert admin.post("/v1/load_lora_adapter", json={"lora_name": "good"}).status_code == 200
        after = greedy_answers(admin)

    wrong = [(o, problem) for o in outcomes if (problem := problem_of(o)) is not None]
    statuses = Counter(o.status for o in outcomes)
    ok_routes = {o.case.kind for o in outcomes if o.status == 200 and isinstance(o.case.kind, tuple)}
    log = fuzz_http_server.log()
    crashes = sum(log.count(mark) for mark in ("Traceback", "unexpected error in an RPC", "Exception in ASGI"))
    figure = (
        f"{len(outcomes):,} HTTP requests ({len(drawn):,} hypothesis-drawn over {len(ROUTES)} routes, unknown paths "
        f"and wrong methods, {len(raw)} raw) in {elapsed:.0f} s: {crashes} crashes, {len(wrong)} broken rules; "
        f"statuses {dict(statuses.most_common())}"
    )
    passed = not wrong and crashes == 0 and after == before
    record(3, "fuzzing (HTTP API)", figure, "no 5xx, OpenAI error JSON, serves the same answers afterwards", passed)
    print(figure)
    assert not wrong, [(o.case.kind, o.case.method, o.case.path, o.case.body[:120], p) for o, p in wrong[:10]]
    assert crashes == 0, log[-4000:]
    assert after == before and all(tokens == MAX_NEW_TOKENS for _, _, tokens in after), (before, after)
    served_routes = {(method.upper(), path) for path, operations in served.items() for method in operations}
    assert served_routes | {("GET", "/openapi.json")} == set(ROUTES), "a route the app serves is not fuzzed"
    assert ok_routes == set(ROUTES), f"routes never answered 200: {sorted(set(ROUTES) - ok_routes)}"
    assert statuses[400] > 0 and statuses[401] > 0 and statuses[403] > 0 and statuses[404] > 0
