"""Reading a JSON request body: at most ``server.max_message_bytes`` bytes (413 beyond, without reading the
rest when Content-Length says so), then parsed as UTF-8 JSON (400 for anything else, lone surrogates included: no
string of a request may be one that cannot be written back as UTF-8) and validated into its schema (400 naming the
first bad field).
A client that hangs up before its body is complete cancels the request (499, sent to nobody) like one that hangs up
later, instead of surfacing as an unexpected error."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from loraplex.server.api.http.errors import InvalidField, body_too_large
from loraplex.server.core.errors import Cancelled

B = TypeVar("B", bound=BaseModel)


def _parse(received: bytes) -> Any:
    """The JSON value of a UTF-8 body; InvalidField when it is not JSON, not UTF-8, or holds a lone surrogate."""
    try:
        data = json.loads(received.decode("utf-8"))  # strict UTF-8: json.loads(bytes) would pass surrogates through
    except ValueError as exc:  # UnicodeDecodeError included
        raise InvalidField(f"the request body is not valid JSON: {exc}") from None
    if b"\\u" in received:  # an escape may be half of a surrogate pair: a string no UTF-8 encoder can write
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidField(
                "the request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair); "
                "send valid Unicode"
            ) from None
    return data


async def read_json(request: Request, schema: type[B], limit: int) -> B:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    received = bytearray()
    try:
        async for part in request.stream():
            received += part
            if len(received) > limit:
                raise body_too_large(limit)
    except ClientDisconnect:
        raise Cancelled(f"the client disconnected after {len(received)} bytes of its request body") from None
    data = _parse(bytes(received))
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidField(f"invalid request body: {problems}", field) from None
