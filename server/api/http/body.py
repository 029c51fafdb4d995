"""Reading a JSON request body: at most ``server.max_message_bytes`` bytes (413 beyond, without reading the
rest when Content-Length says so), then parsed and validated into its schema (400 naming the first bad field)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from loraplex.server.api.http.errors import InvalidField, body_too_large

B = TypeVar("B", bound=BaseModel)


async def read_json(request: Request, schema: type[B], limit: int) -> B:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    received = bytearray()
    async for part in request.stream():
        received += part
        if len(received) > limit:
            raise body_too_large(limit)
    try:
        data = json.loads(received)
    except ValueError as exc:
        raise InvalidField(f"the request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidField(f"invalid request body: {problems}", field) from None
