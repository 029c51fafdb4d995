"""The loraplex.v1 Adapters servicer (load, unload, list, get, upload) and the adapter-load wait it shares with the
OIP model-repository calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.server.api import convert
from loraplex.server.api.auth import Tenant, current_tenant
from loraplex.server.api.catalog import adapter_listing, checked
from loraplex.server.api.state import Context, ServingState
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.lora.upload import AdapterUpload, InvalidUpload, UploadConflict, UploadedFile, upload_target


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
        self._roots = AdapterRoots.of(state.settings.adapters.roots)
        self._uploading: set[str] = set()

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
        cap = self._state.settings.adapters.list_limit
        limit = min(request.limit or cap, cap)
        listing = await adapter_listing(self._state.engine(), self._roots, current_tenant(), limit)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.listed_message(listed) for listed in listing.adapters],
            truncated=listing.truncated,
            total=listing.total,
        )

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest, context: Context) -> adapters_pb2.Adapter:
        if not request.adapter_id:
            raise InvalidRequest("adapter_id is empty: name the adapter to show")
        current_tenant().check_adapter(request.adapter_id)
        return convert.listed_message(await checked(self._state.engine().adapter_info(request.adapter_id)))

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[adapters_pb2.UploadAdapterChunk], context: Context
    ) -> adapters_pb2.Adapter:
        tenant = current_tenant()
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidUpload("the first message of UploadAdapter must be the header (adapter id and files)")
        header = first.header
        if not header.adapter_id:
            raise InvalidUpload("adapter_id is empty: name the adapter to upload")
        tenant.check_adapter(header.adapter_id)
        if header.adapter_id in self._uploading:
            raise UploadConflict(f"an upload of adapter '{header.adapter_id}' is running; wait for it to finish")
        self._uploading.add(header.adapter_id)
        # Installing and loading finish even when the caller goes away, so the files on disk and the served version
        # always agree.
        task = asyncio.ensure_future(self._receive_and_load(tenant, header, request_iterator))
        task.add_done_callback(lambda _: self._uploading.discard(header.adapter_id))
        await asyncio.shield(task)
        return convert.adapter_message(self._state.engine().adapter_info(header.adapter_id))

    async def _receive_and_load(
        self,
        tenant: Tenant,
        header: adapters_pb2.UploadAdapterHeader,
        chunks: AsyncIterator[adapters_pb2.UploadAdapterChunk],
    ) -> None:
        settings = self._state.settings.adapters
        upload_root = settings.upload_directory()
        if upload_root is None:
            raise UploadConflict("the server has no adapter root to upload into; start it with --adapter-root")
        target = upload_target(AdapterRoots.of(settings.roots), upload_root, header.adapter_id)
        files = [UploadedFile(f.name, f.size_bytes, f.sha256) for f in header.files]
        upload = await asyncio.to_thread(AdapterUpload, target, upload_root, files, settings.max_file_bytes)
        try:
            async for chunk in chunks:
                if chunk.HasField("header"):
                    raise InvalidUpload("only the first message of UploadAdapter may be a header")
                await asyncio.to_thread(upload.write, chunk.data)
            installed = await asyncio.to_thread(upload.install)
        except BaseException:
            await asyncio.to_thread(upload.abort)
            raise
        try:
            await load_adapter(self._state, tenant, header.adapter_id, header.pin if header.HasField("pin") else None)
        except BaseException:
            await asyncio.to_thread(installed.rollback)
            raise
        await asyncio.to_thread(installed.commit)
