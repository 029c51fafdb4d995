"""What serves a request: the base model, an adapter, or an A/B route's variant, checked against the caller's tenant.

Routes are reserved in the API; until A/B routing exists every route is unknown (NOT_FOUND).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.server.api.auth import BASE_MODEL, Tenant
from loraplex.server.api.errors import RouteNotFound
from loraplex.server.engine.errors import InvalidRequest


@dataclass(frozen=True)
class Target:
    adapter_id: str | None  # None = the base model
    route: str = ""
    variant: str = ""


def resolve(tenant: Tenant, adapter_id: str, route: str) -> Target:
    """The target of a request naming ``adapter_id`` ("" = base) or ``route``."""
    if adapter_id and route:
        raise InvalidRequest("name either adapter_id or route, not both")
    if route:
        tenant.check_route(route)
        raise RouteNotFound(f"unknown route '{route}': no A/B routes are configured on this server")
    tenant.check_adapter(adapter_id or None)
    return Target(adapter_id or None)


def resolve_model(tenant: Tenant, model_name: str) -> Target:
    """The target of an Open Inference Protocol model name: "base" or an adapter id."""
    if not model_name:
        raise InvalidRequest(f"model_name is empty: use '{BASE_MODEL}', an adapter id or a route")
    return resolve(tenant, "" if model_name == BASE_MODEL else model_name, "")
