"""The loraplex.v1 Adapters servicer (load, unload, list, get) and the adapter-load wait it shares with the OIP
model-repository calls."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.server.api import convert
from loraplex.server.api.auth import Tenant, current_tenant
from loraplex.server.api.state import Context, ServingState
from loraplex.server.engine.errors import InvalidRequest


async def load_adapter(state: ServingState, tenant: Tenant, adapter_id: str, pin: bool | None) -> None:
    """Loads ``adapter_id`` and waits until it is in memory (AdapterRejected says why it cannot be).

    The load is shared with every request waiting for the same adapter, so a caller that gives up (deadline,
    cancellation) stops waiting without cancelling the load itself.
    """
    if not adapter_id:
        raise InvalidRequest("adapter_id is empty: name the adapter to load")
    tenant.check_adapter(adapter_id)
    future: Future[Any] = state.engine().load_adapter(adapter_id, pin)
    waiter = asyncio.wrap_future(future)
    try:
        await asyncio.shield(waiter)
    except asyncio.CancelledError:
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieve a late failure
        raise


def unload_adapter(state: ServingState, tenant: Tenant, adapter_id: str) -> None:
    if not adapter_id:
        raise InvalidRequest("adapter_id is empty: name the adapter to unload")
    tenant.check_adapter(adapter_id)
    state.engine().unload_adapter(adapter_id)


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, state: ServingState) -> None:
        self._state = state

    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest, context: Context) -> adapters_pb2.Adapter:
        pin = request.pin if request.HasField("pin") else None
        await load_adapter(self._state, current_tenant(), request.adapter_id, pin)
        return convert.adapter_message(self._state.engine().adapter_info(request.adapter_id))

    async def UnloadAdapter(
        self, request: adapters_pb2.UnloadAdapterRequest, context: Context
    ) -> adapters_pb2.UnloadAdapterResponse:
        unload_adapter(self._state, current_tenant(), request.adapter_id)
        return adapters_pb2.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: Context
    ) -> adapters_pb2.ListAdaptersResponse:
        tenant = current_tenant()
        infos = self._state.engine().list_adapters()
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_message(info) for info in infos if tenant.may_use_adapter(info.adapter_id)]
        )

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest, context: Context) -> adapters_pb2.Adapter:
        if not request.adapter_id:
            raise InvalidRequest("adapter_id is empty: name the adapter to show")
        current_tenant().check_adapter(request.adapter_id)
        return convert.adapter_message(self._state.engine().adapter_info(request.adapter_id))
