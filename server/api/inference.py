"""The Open Inference Protocol v2 servicer (package ``inference``), with Triton's decoupled streaming and model
repository extensions mapped onto loraplex: a model is "base", an adapter id or a route.

A route's sticky key travels as the request parameter ``user_key``; the last response of a routed request names
its ``route`` and ``variant`` in its parameters.

RepositoryIndex names the base model and at most ``adapters.list_limit`` adapters: those in memory and those on the
adapter roots (see :mod:`catalog`, which keeps the ones in memory when there are more).

ModelStreamInfer is decoupled: each request on the stream runs concurrently, every token chunk is one response
carrying ``text_output`` and the parameter ``triton_final_response`` (false), and the last response of a request
has ``triton_final_response`` true, its finish reason and token counts (and no outputs when the client asked for
``triton_enable_empty_final_response``). A failed request gets a response with ``error_message``; the stream stays
open for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from contextlib import aclosing
from dataclasses import dataclass

import loraplex.server
from loraplex.proto.inference import grpc_service_pb2 as oip
from loraplex.proto.inference import grpc_service_pb2_grpc as oip_grpc
from loraplex.server.api import oip_tensors
from loraplex.server.api.adapters import load_adapter, unload_adapter
from loraplex.server.api.auth import current_tenant
from loraplex.server.api.catalog import Listed, adapter_listing
from loraplex.server.api.errors import status_of
from loraplex.server.api.generation import deadline_of, request_id_of
from loraplex.server.api.state import Context, ServingState
from loraplex.server.api.targets import Target, is_visible_route, resolve_model
from loraplex.server.api.tracking import RequestTrack
from loraplex.server.core.errors import AdapterNotFound, InternalError, InvalidRequest
from loraplex.server.core.types import Finished, GenerationRequest, ResidencyTier, TokenDelta
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.routing.routes import BASE_MODEL

BASE_VERSION = "1"
PLATFORM = "loraplex"
EXTENSIONS = ("model_repository", "parameters")
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
USER_KEY = "user_key"  # request parameter: the sticky bucketing key of a route


@dataclass(frozen=True)
class _Prepared:
    request: GenerationRequest
    target: Target
    model_name: str
    client_id: str  # the request's own id, echoed in its responses
    output_shape: list[int]
    stream: bool | None


def _set_parameter(parameters: MutableMapping[str, oip.InferParameter], name: str, value: bool | int | str) -> None:
    parameter = parameters[name]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    else:
        parameter.string_param = value


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self._state = state
        self._roots = AdapterRoots.of(state.settings.adapters.roots)

    # ------------------------------------------------------------------------------------------ health, metadata

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._state.ready)

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=PLATFORM, version=loraplex.server.__version__, extensions=EXTENSIONS)

    def _model(self, model_name: str) -> Target | None:
        """The target of a metadata call's model; None for a route (checked against the tenant, never assigned)."""
        if is_visible_route(current_tenant(), self._state.router, model_name):
            return None
        return resolve_model(current_tenant(), self._state.router, model_name)

    def _served_version(self, target: Target) -> str:
        """The version now served for ``target``; AdapterNotFound when the adapter is not loaded."""
        if target.adapter_id is None:
            return BASE_VERSION
        return str(self._state.engine().adapter_info(target.adapter_id).version)

    def _check_version(self, target: Target, model_name: str, version: str) -> None:
        if version and version != (served := self._served_version(target)):
            raise AdapterNotFound(f"model '{model_name}' version {version} is not served (it serves version {served})")

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Context) -> oip.ModelReadyResponse:
        target = self._model(request.name)
        if not self._state.ready:
            return oip.ModelReadyResponse(ready=False)
        if target is None or target.adapter_id is None:
            return oip.ModelReadyResponse(ready=request.version in ("", BASE_VERSION))
        try:
            info = self._state.engine().adapter_info(target.adapter_id)
        except AdapterNotFound:
            return oip.ModelReadyResponse(ready=False)
        ready = info.tier is not ResidencyTier.LOADING and request.version in ("", str(info.version))
        return oip.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Context) -> oip.ModelMetadataResponse:
        target = self._model(request.name) or Target(None)  # a route has one version, like the base model
        self._check_version(target, request.name, request.version)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=[self._served_version(target)],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype=d, shape=s) for n, (d, s, _) in oip_tensors.LLM_INPUTS.items()],
            outputs=[tensor(name=oip_tensors.TEXT_OUTPUT, datatype="BYTES", shape=[-1])],
        )

    # ------------------------------------------------------------------------------------------------ inference

    @staticmethod
    def _user_key(request: oip.ModelInferRequest) -> str:
        if USER_KEY not in request.parameters:
            return ""
        parameter = request.parameters[USER_KEY]
        if parameter.WhichOneof("parameter_choice") != "string_param":
            raise InvalidRequest(f"the parameter '{USER_KEY}' (a route's sticky key) must be a string")
        return parameter.string_param

    def _prepare(self, request: oip.ModelInferRequest, context: Context, record: RequestTrack) -> _Prepared:
        user_key = self._user_key(request)
        target = resolve_model(current_tenant(), self._state.router, request.model_name, user_key)
        record.resolved(target)
        if request.model_version:  # a route has one version, like the base model
            self._check_version(
                target if target.assignment is None else Target(None), request.model_name, request.model_version
            )
        unknown = [output.name for output in request.outputs if output.name != oip_tensors.TEXT_OUTPUT]
        if unknown:
            raise InvalidRequest(f"unknown requested outputs {unknown}; the only output is '{oip_tensors.TEXT_OUTPUT}'")
        tenant = current_tenant()
        llm = oip_tensors.llm_request(
            oip_tensors.decode_inputs(request),
            {name: value for name, value in request.parameters.items() if name != USER_KEY},
            self._state.settings.server.default_max_new_tokens,
        )
        shape = next(list(t.shape) for t in request.inputs if t.name == oip_tensors.TEXT_INPUT)
        engine_request = GenerationRequest(
            request_id=request_id_of(request.id),
            prompt=llm.prompt,
            adapter_id=target.adapter_id,
            sampling=llm.sampling,
            deadline=deadline_of(context),
            tenant=tenant.name,
            tenant_weight=tenant.weight,
        )
        return _Prepared(engine_request, target, request.model_name, request.id, shape, llm.stream)

    @staticmethod
    def _chunk(prepared: _Prepared, text: str) -> oip.ModelInferResponse:
        response = oip.ModelInferResponse(model_name=prepared.model_name, id=prepared.client_id)
        tensor, raw = oip_tensors.text_output(text, prepared.output_shape)
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
        return response

    @classmethod
    def _final(cls, prepared: _Prepared, text: str, finished: Finished) -> oip.ModelInferResponse:
        response = cls._chunk(prepared, text)
        response.model_version = str(finished.adapter_version) if prepared.target.adapter_id else BASE_VERSION
        _set_parameter(response.parameters, "finish_reason", finished.finish_reason.value)
        _set_parameter(response.parameters, "prompt_tokens", finished.usage.prompt_tokens)
        _set_parameter(response.parameters, "completion_tokens", finished.usage.completion_tokens)
        if prepared.target.assignment is not None:
            _set_parameter(response.parameters, "route", prepared.target.route)
            _set_parameter(response.parameters, "variant", prepared.target.variant)
        return response

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Context) -> oip.ModelInferResponse:
        async with self._state.track() as record:
            prepared = self._prepare(request, context, record)
            text: list[str] = []
            async with aclosing(self._state.generate(prepared.request, record)) as events:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        text.append(event.text)
                    else:
                        return self._final(prepared, "".join(text), event)
            raise InternalError("the generation ended without a result")

    async def _stream_one(
        self, request: oip.ModelInferRequest, context: Context, out: asyncio.Queue[oip.ModelStreamInferResponse | None]
    ) -> None:
        """Runs one request of a stream, putting its responses (or its error) on ``out``."""
        try:
            async with self._state.track() as record:
                await self._stream_events(request, context, record, out)
        except Exception as exc:
            code, message = status_of(exc)
            failed = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
            _set_parameter(failed.parameters, FINAL, True)
            await out.put(oip.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=failed))

    async def _stream_events(
        self,
        request: oip.ModelInferRequest,
        context: Context,
        record: RequestTrack,
        out: asyncio.Queue[oip.ModelStreamInferResponse | None],
    ) -> None:
        prepared = self._prepare(request, context, record)
        empty_final = EMPTY_FINAL in request.parameters and request.parameters[EMPTY_FINAL].bool_param
        text: list[str] = []
        async with aclosing(self._state.generate(prepared.request, record)) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    if prepared.stream is False:
                        text.append(event.text)
                    elif event.text:
                        chunk = self._chunk(prepared, event.text)
                        _set_parameter(chunk.parameters, FINAL, False)
                        await out.put(oip.ModelStreamInferResponse(infer_response=chunk))
                    continue
                last = self._final(prepared, "".join(text), event)
                if empty_final:
                    del last.outputs[:]
                    del last.raw_output_contents[:]
                _set_parameter(last.parameters, FINAL, True)
                await out.put(oip.ModelStreamInferResponse(infer_response=last))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: Context
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        out: asyncio.Queue[oip.ModelStreamInferResponse | None] = asyncio.Queue(
            maxsize=self._state.settings.engine.max_stream_backlog
        )
        tasks: set[asyncio.Task[None]] = set()
        failures: list[Exception] = []

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, context, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            except Exception as exc:  # the request stream broke: end the call with its error
                failures.append(exc)
            await out.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await out.get()) is not None:
                yield response
            if failures:
                raise failures[0]
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # ------------------------------------------------------------------------------------------------ repository

    @staticmethod
    def _model_index(listed: Listed) -> oip.RepositoryIndexResponse.ModelIndex:
        index = oip.RepositoryIndexResponse.ModelIndex
        if listed.info is not None:
            state = "LOADING" if listed.tier is ResidencyTier.LOADING else "READY"
            return index(name=listed.adapter_id, version=str(listed.info.version), state=state)
        if listed.loading:
            return index(name=listed.adapter_id, state="LOADING")
        return index(name=listed.adapter_id, state="UNAVAILABLE", reason="not loaded (loads on first use)")

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: Context
    ) -> oip.RepositoryIndexResponse:
        tenant = current_tenant()
        listing = await adapter_listing(
            self._state.engine(),
            self._roots,
            tenant,
            self._state.settings.adapters.list_limit,
            on_disk=not request.ready,  # an adapter only on disk is never ready
        )
        index = oip.RepositoryIndexResponse.ModelIndex
        models = [index(name=BASE_MODEL, version=BASE_VERSION, state="READY")] if tenant.may_use_adapter(None) else []
        models += [self._model_index(listed) for listed in listing.adapters]
        if request.ready:
            models = [model for model in models if model.state == "READY"]
        return oip.RepositoryIndexResponse(models=models)

    def _repository_model(self, model_name: str) -> Target:
        target = self._model(model_name)
        if target is None:
            raise InvalidRequest(
                f"'{model_name}' is an A/B route: load or unload its adapters by their ids (routes change through "
                "loraplex.v1.Routing)"
            )
        return target

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: Context
    ) -> oip.RepositoryModelLoadResponse:
        target = self._repository_model(request.model_name)
        unknown = sorted(set(request.parameters) - {"pin"})
        if unknown:
            raise InvalidRequest(
                f"unsupported load parameters {unknown}: adapters load from the server's adapter roots; the only "
                "parameter is the bool 'pin'"
            )
        pin = request.parameters["pin"].bool_param if "pin" in request.parameters else None
        if target.adapter_id is not None:
            await load_adapter(self._state, current_tenant(), target.adapter_id, pin)
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: Context
    ) -> oip.RepositoryModelUnloadResponse:
        target = self._repository_model(request.model_name)
        if target.adapter_id is None:
            raise InvalidRequest(f"the base model '{BASE_MODEL}' cannot be unloaded")
        unload_adapter(self._state, current_tenant(), target.adapter_id)
        return oip.RepositoryModelUnloadResponse()
