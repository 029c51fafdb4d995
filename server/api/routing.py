"""The loraplex.v1 Routing servicer: set, delete and list A/B routes, take feedback, report per-variant statistics.

SetRoute loads every adapter the route names before the route changes, so a route whose adapter is missing (or
cannot be served) is refused when it is set, not when a user hits it. SetRoute and DeleteRoute are admin calls
(``interceptors.ADMIN_METHODS``); every call is limited to the routes the tenant's patterns allow.
"""

from __future__ import annotations

import asyncio

from loraplex.proto.v1 import routing_pb2, routing_pb2_grpc
from loraplex.server.api import route_messages
from loraplex.server.api.adapters import load_adapter
from loraplex.server.api.auth import Tenant, current_tenant
from loraplex.server.api.state import Context, ServingState
from loraplex.server.core.errors import AdapterNotFound, AdapterRejected, InvalidRequest
from loraplex.server.routing.errors import InvalidFeedback
from loraplex.server.routing.routes import Route, validate_route_name

_LABELS = {routing_pb2.FEEDBACK_LABEL_GOOD: True, routing_pb2.FEEDBACK_LABEL_BAD: False}


class RoutingServicer(routing_pb2_grpc.RoutingServicer):
    def __init__(self, state: ServingState) -> None:
        self._state = state

    async def _load_adapters(self, tenant: Tenant, route: Route) -> None:
        """Loads each adapter of ``route``; an adapter that is missing or rejected fails the call, naming the route."""
        targets = [(v.name, v.adapter_id) for v in route.variants]
        if route.shadow is not None:
            targets.append(("shadow", route.shadow.adapter_id))
        for _, adapter_id in targets:
            tenant.check_adapter(adapter_id)
        for name, adapter_id in targets:
            if adapter_id is None:
                continue
            try:
                await load_adapter(self._state, tenant, adapter_id, pin=None)
            except (AdapterNotFound, AdapterRejected, InvalidRequest) as exc:
                raise type(exc)(f"route '{route.name}', {name}: {exc}; fix the route or add the adapter") from exc

    async def SetRoute(self, request: routing_pb2.SetRouteRequest, context: Context) -> routing_pb2.Route:
        tenant = current_tenant()
        route = route_messages.route_of(request.route)
        tenant.check_route(route.name)
        await self._load_adapters(tenant, route)
        compiled = await asyncio.to_thread(self._state.router.set_route, route)
        return route_messages.route_message(compiled.route)

    async def DeleteRoute(
        self, request: routing_pb2.DeleteRouteRequest, context: Context
    ) -> routing_pb2.DeleteRouteResponse:
        current_tenant().check_route(validate_route_name(request.name))
        await asyncio.to_thread(self._state.router.delete_route, request.name)
        return routing_pb2.DeleteRouteResponse()

    async def ListRoutes(
        self, request: routing_pb2.ListRoutesRequest, context: Context
    ) -> routing_pb2.ListRoutesResponse:
        tenant = current_tenant()
        routes = [c.route for c in self._state.router.routes() if tenant.may_use_route(c.route.name)]
        return routing_pb2.ListRoutesResponse(routes=[route_messages.route_message(r) for r in routes])

    async def Feedback(self, request: routing_pb2.FeedbackRequest, context: Context) -> routing_pb2.FeedbackResponse:
        if not request.request_id:
            raise InvalidRequest("request_id is empty: name the request the feedback is about")
        if request.label != routing_pb2.FEEDBACK_LABEL_UNSPECIFIED and request.label not in _LABELS:
            raise InvalidFeedback(f"unknown feedback label {request.label}: use GOOD or BAD (or none with a score)")
        router = self._state.router
        router.served(request.request_id, current_tenant().may_use_route)  # another tenant's: as if unknown
        score = request.score if request.HasField("score") else None
        served = router.feedback(request.request_id, _LABELS.get(request.label), score)
        if request.label in _LABELS:
            self._state.telemetry.feedback(served.route, served.variant, "good" if _LABELS[request.label] else "bad")
        if score is not None:
            self._state.telemetry.feedback(served.route, served.variant, "score")
        return routing_pb2.FeedbackResponse(route=served.route, variant=served.variant)

    async def GetRouteReport(
        self, request: routing_pb2.GetRouteReportRequest, context: Context
    ) -> routing_pb2.RouteReport:
        current_tenant().check_route(validate_route_name(request.route))
        return route_messages.report_message(self._state.router.report(request.route))
