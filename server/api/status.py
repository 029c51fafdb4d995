"""The loraplex.v1 Server servicer: what the server holds and how busy it is."""

from __future__ import annotations

import loraplex.server
from loraplex.proto.v1 import server_pb2, server_pb2_grpc
from loraplex.server.api.state import Context, ServingState


class ServerServicer(server_pb2_grpc.ServerServicer):
    def __init__(self, state: ServingState) -> None:
        self._state = state

    async def GetStatus(self, request: server_pb2.GetStatusRequest, context: Context) -> server_pb2.ServerStatus:
        engine = self._state.engine()
        stats = engine.stats()
        return server_pb2.ServerStatus(
            version=loraplex.server.__version__,
            base_model=engine.base.name,
            accepting=engine.accepting and self._state.ready,
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            kv_cache_usage=stats.kv_cache_usage,
            adapters_on_device=stats.adapters_on_device,
            adapters_on_host=stats.adapters_on_host,
            active_streams=self._state.active_streams,
        )
