"""``GET /v1/models``: what the caller may name as ``model``, shaped like OpenAI's (and vLLM's) model list.

The base model (``base``, its ``root`` the base's own name), every adapter the tenant may use, in memory or only
on the adapter roots (``parent`` is the base, as vLLM lists LoRA adapters; at most ``adapters.list_limit``, chosen
as for ListAdapters), and the A/B routes the tenant may use. Each entry carries a ``loraplex`` object with its kind
(and an adapter's tier and version, or a route's variants).
"""

from __future__ import annotations

from typing import Any

from loraplex.server.api.auth import Tenant
from loraplex.server.api.catalog import Listed, adapter_listing
from loraplex.server.api.state import ServingState
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.routing.routes import BASE_MODEL

OWNER = "loraplex"


def _entry(model_id: str, created: int, root: str, parent: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "root": root,
        "parent": parent,
        "loraplex": extra,
    }


def _adapter(listed: Listed, created: int) -> dict[str, Any]:
    info = listed.info
    extra = {"kind": "adapter", "tier": str(listed.tier), "version": info.version if info else None}
    return _entry(listed.adapter_id, int(info.loaded_at) if info else created, listed.adapter_id, BASE_MODEL, extra)


async def model_list(state: ServingState, roots: AdapterRoots, tenant: Tenant, started: float) -> dict[str, Any]:
    engine = state.engine()
    created = int(started)
    data: list[dict[str, Any]] = []
    if tenant.may_use_adapter(None):
        extra = {"kind": "base", "max_model_len": state.settings.engine.max_seq_len}
        data.append(_entry(BASE_MODEL, created, engine.base.name, None, extra))
    listing = await adapter_listing(engine, roots, tenant, state.settings.adapters.list_limit)
    data += [_adapter(listed, created) for listed in listing.adapters]
    for compiled in state.router.routes():
        route = compiled.route
        if tenant.may_use_route(route.name):
            variants = [{"name": v.name, "adapter": v.adapter, "weight": v.weight} for v in route.variants]
            data.append(_entry(route.name, created, route.name, None, {"kind": "route", "variants": variants}))
    return {"object": "list", "data": data}
