"""The FastAPI application of the OpenAI-compatible API: its routes, bearer-token auth and error handlers.

Every ``/v1`` route authenticates the ``Authorization: Bearer <token>`` header against the same token table as
gRPC (open access when auth is off); ``/health`` (liveness) and ``/ready`` (readiness: 503 while the base model
loads and while the server drains) need no token, like gRPC health. Handlers stay thin: request JSON goes through
:mod:`.convert`, generations through :mod:`.generate` and :mod:`.respond` (cancelled when the client disconnects
first: :mod:`.disconnect`), and every error through :func:`.errors.error_response`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import loraplex.server
from loraplex.server.api.auth import OPEN_ACCESS, Tenant, TokenTable
from loraplex.server.api.errors import ApiError
from loraplex.server.api.http import admin, convert
from loraplex.server.api.http.body import read_json
from loraplex.server.api.http.disconnect import unless_disconnected
from loraplex.server.api.http.errors import HttpError, error_response, no_such_path
from loraplex.server.api.http.generate import start
from loraplex.server.api.http.models import model_list
from loraplex.server.api.http.respond import respond
from loraplex.server.api.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from loraplex.server.api.state import ServingState
from loraplex.server.core.errors import EngineError
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.lora.upload import UploadError
from loraplex.server.routing.errors import RoutingError

_TYPED_ERRORS = (ApiError, EngineError, RoutingError, UploadError, HttpError)


def create_app(state: ServingState, tokens: TokenTable | None) -> FastAPI:
    app = FastAPI(title="loraplex", version=loraplex.server.__version__, docs_url=None, redoc_url=None)
    roots = AdapterRoots.of(state.settings.adapters.roots)
    limit = state.settings.server.max_message_bytes
    default_max = state.settings.server.default_max_new_tokens
    started = time.time()

    def tenant_of(request: Request) -> Tenant:
        return OPEN_ACCESS if tokens is None else tokens.authenticate(request.headers.items())

    async def answer(tenant: Tenant, spec: convert.Spec) -> Response:
        return await respond(await start(state, tenant, spec), spec)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        tenant = tenant_of(request)
        spec = convert.completion_spec(await read_json(request, CompletionRequest, limit), default_max)
        return await unless_disconnected(request, answer(tenant, spec))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        tenant = tenant_of(request)
        spec = convert.chat_spec(await read_json(request, ChatCompletionRequest, limit), default_max)
        return await unless_disconnected(request, answer(tenant, spec))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return await model_list(state, roots, tenant_of(request), started)

    @app.post(admin.LOAD_PATH)
    async def load_lora_adapter(request: Request) -> dict[str, Any]:
        tenant = tenant_of(request)
        return await admin.load(state, roots, tenant, await read_json(request, LoadLoraAdapterRequest, limit))

    @app.post(admin.UNLOAD_PATH)
    async def unload_lora_adapter(request: Request) -> dict[str, Any]:
        tenant = tenant_of(request)
        return admin.unload(state, tenant, await read_json(request, UnloadLoraAdapterRequest, limit))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "phase": str(state.phase)}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready, "phase": str(state.phase)}, status_code=200 if state.ready else 503)

    async def typed_error(request: Request, error: Exception) -> Response:
        return error_response(error)

    async def http_error(request: Request, error: Exception) -> Response:
        status = error.status_code if isinstance(error, HTTPException) else 500
        return error_response(no_such_path(request.method, request.url.path, status))

    for kind in (*_TYPED_ERRORS, Exception):
        app.add_exception_handler(kind, typed_error)
    app.add_exception_handler(HTTPException, http_error)
    return app
