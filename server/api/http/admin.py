"""vLLM's adapter admin endpoints, ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, on the same
load and unload as the gRPC admin RPCs (admin scope, the tenant's adapter patterns, a load shared with waiting
requests).

loraplex serves adapters by id from its adapter roots, never from an arbitrary path: ``lora_name`` is the id, and a
``lora_path``, when given, must name that adapter's own directory under a root (absolute, or relative to a root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex.server.api.adapters import load_adapter, unload_adapter
from loraplex.server.api.auth import Tenant
from loraplex.server.api.http.errors import InvalidField
from loraplex.server.api.http.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loraplex.server.api.state import ServingState
from loraplex.server.core.errors import AdapterNotFound
from loraplex.server.lora.sources import (
    AdapterDirectoryMissing,
    AdapterOutsideRoot,
    AdapterRoots,
    InvalidAdapterId,
    validate_adapter_id,
)

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"


def _directory(roots: AdapterRoots, adapter_id: str) -> Path:
    try:
        return roots.resolve(adapter_id)
    except (InvalidAdapterId, AdapterOutsideRoot) as exc:
        raise InvalidField(str(exc), "lora_name") from None
    except AdapterDirectoryMissing as exc:
        raise AdapterNotFound(str(exc)) from None


def check_path(roots: AdapterRoots, adapter_id: str, lora_path: str) -> None:
    """``lora_path`` must be the directory ``adapter_id`` resolves to (InvalidField otherwise)."""
    directory = _directory(roots, adapter_id)
    try:
        given = Path(lora_path).expanduser()
        candidates = [given] if given.is_absolute() else [root / given for root in roots.roots]
        same = any(candidate.resolve() == directory for candidate in candidates)
    except (OSError, RuntimeError, ValueError):  # "~user" of no such user, a NUL byte, a symlink loop: not it
        same = False
    if not same:
        raise InvalidField(
            f"lora_path must be the directory of adapter '{adapter_id}' under an adapter root: loraplex loads "
            "adapters by id from its roots only (leave lora_path out, or copy the adapter under a root)",
            "lora_path",
        )


async def load(
    state: ServingState, roots: AdapterRoots, tenant: Tenant, body: LoadLoraAdapterRequest
) -> dict[str, Any]:
    tenant.check_admin(LOAD_PATH)
    tenant.check_adapter(body.lora_name)
    try:
        validate_adapter_id(body.lora_name)
    except InvalidAdapterId as exc:
        raise InvalidField(str(exc), "lora_name") from None
    if body.lora_path:
        check_path(roots, body.lora_name, body.lora_path)
    await load_adapter(state, tenant, body.lora_name, body.pin)
    info = state.engine().adapter_info(body.lora_name)
    return {
        "object": "lora_adapter",
        "id": info.adapter_id,
        "version": info.version,
        "content_hash": info.content_hash,
        "rank": info.rank,
        "pinned": info.pinned,
        "message": f"Success: LoRA adapter '{info.adapter_id}' added successfully (version {info.version}).",
    }


def unload(state: ServingState, tenant: Tenant, body: UnloadLoraAdapterRequest) -> dict[str, Any]:
    tenant.check_admin(UNLOAD_PATH)
    unload_adapter(state, tenant, body.lora_name)
    return {
        "object": "lora_adapter",
        "id": body.lora_name,
        "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
    }
