"""What serves a request: the base model, an adapter, or an A/B route's variant, checked against the caller's tenant.

A tenant may use a route when one of its route patterns matches the route's name; the adapters behind the route's
variants need no adapter pattern of their own (an admin chose them when setting the route).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.server.api.auth import Tenant
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.routing.router import Assignment, Router
from loraplex.server.routing.routes import BASE_MODEL


@dataclass(frozen=True)
class Target:
    adapter_id: str | None  # None = the base model
    assignment: Assignment | None = None  # set for a request on a route

    @property
    def route(self) -> str:
        return self.assignment.route if self.assignment is not None else ""

    @property
    def variant(self) -> str:
        return self.assignment.variant.name if self.assignment is not None else ""


def resolve(tenant: Tenant, router: Router, adapter_id: str, route: str, user_key: str = "") -> Target:
    """The target of a request naming ``adapter_id`` ("" = base) or ``route`` (with an optional sticky key)."""
    if adapter_id and route:
        raise InvalidRequest("name either adapter_id or route, not both")
    if route:
        tenant.check_route(route)
        assignment = router.assign(route, user_key)
        return Target(assignment.variant.adapter_id, assignment)
    tenant.check_adapter(adapter_id or None)
    return Target(adapter_id or None)


def is_visible_route(tenant: Tenant, router: Router, model_name: str) -> bool:
    """Whether ``model_name`` names a route the tenant may use. Another tenant's route reads as an adapter name,
    so the answer (PERMISSION_DENIED or NOT_FOUND on the adapter) never tells that such a route exists."""
    return bool(model_name) and tenant.may_use_route(model_name) and router.has_route(model_name)


def resolve_model(tenant: Tenant, router: Router, model_name: str, user_key: str = "") -> Target:
    """The target of an Open Inference Protocol model name: a route (which wins over an adapter of the same name),
    "base" or an adapter id."""
    if not model_name:
        raise InvalidRequest(f"model_name is empty: use '{BASE_MODEL}', an adapter id or a route")
    if is_visible_route(tenant, router, model_name):
        return resolve(tenant, router, "", model_name, user_key)
    return resolve(tenant, router, "" if model_name == BASE_MODEL else model_name, "")
