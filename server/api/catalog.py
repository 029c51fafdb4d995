"""The adapters a tenant may see, for ListAdapters and the OIP RepositoryIndex: the engine's adapters in memory
joined with the ids found on the adapter roots, at most a given number of them.

Discovery and the files-changed check (which GetAdapter uses too) read the disk, so they run on a worker thread,
off the event loop. When the tenant may see more adapters than the limit, pinned ones are kept first, then those in
memory, then those loaded once or loading, then those only on disk; the kept ones are listed sorted by id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.server.api.auth import Tenant
from loraplex.server.core.types import AdapterInfo, ResidencyTier
from loraplex.server.lora.sources import AdapterRoots, files_signature

if TYPE_CHECKING:
    from loraplex.server.engine.engine import Engine


@dataclass(frozen=True)
class Listed:
    """One adapter of a listing; ``info`` is None while it has no version in memory."""

    adapter_id: str
    info: AdapterInfo | None
    loading: bool = False  # no version yet, its first load is running
    files_changed: bool = False  # the files of info's version changed on disk since it was read

    @property
    def tier(self) -> ResidencyTier:
        if self.info is not None:
            return self.info.tier
        return ResidencyTier.LOADING if self.loading else ResidencyTier.DISK


@dataclass(frozen=True)
class Listing:
    adapters: tuple[Listed, ...]  # sorted by id
    total: int  # adapters the tenant may see, listed or not

    @property
    def truncated(self) -> bool:
        return len(self.adapters) < self.total


def _keep_order(listed: Listed) -> tuple[int, str]:
    """Sort key of what a truncated listing keeps first."""
    info = listed.info
    if info is not None and info.pinned:
        rank = 0
    elif info is not None and info.tier is not ResidencyTier.DISK:
        rank = 1
    elif info is not None or listed.loading:
        rank = 2
    else:
        rank = 3
    return rank, listed.adapter_id


def _with_files_checked(listed: Listed) -> Listed:
    info = listed.info
    if info is None or files_signature(Path(info.source_dir)) == info.files_signature:
        return listed
    return Listed(listed.adapter_id, info, files_changed=True)


def _assemble(
    loaded: Iterable[AdapterInfo],
    first_loads: frozenset[str],
    on_disk: Iterable[str],
    tenant: Tenant,
    limit: int,
) -> Listing:
    """Joins, filters for ``tenant``, bounds and checks the files of the adapters (blocking: reads the disk)."""
    listed = {info.adapter_id: Listed(info.adapter_id, info) for info in loaded}
    for adapter_id in (*first_loads, *on_disk):
        listed.setdefault(adapter_id, Listed(adapter_id, None, loading=adapter_id in first_loads))
    visible = [entry for adapter_id, entry in listed.items() if tenant.may_use_adapter(adapter_id)]
    kept = sorted(sorted(visible, key=_keep_order)[:limit], key=lambda entry: entry.adapter_id)
    return Listing(tuple(_with_files_checked(entry) for entry in kept), total=len(visible))


async def checked(info: AdapterInfo) -> Listed:
    """``info`` as a listed adapter whose files were compared with those on disk (off the event loop)."""
    return await asyncio.to_thread(_with_files_checked, Listed(info.adapter_id, info))


async def adapter_listing(
    engine: Engine, roots: AdapterRoots, tenant: Tenant, limit: int, *, on_disk: bool = True
) -> Listing:
    """At most ``limit`` of the adapters ``tenant`` may use: those in memory, and with ``on_disk`` also every
    adapter directory under ``roots``."""
    # First loads before the loaded ones: a load finishing in between is then listed as loaded, never missed.
    first_loads = engine.first_loads()
    loaded = engine.list_adapters()

    def assemble() -> Listing:
        return _assemble(loaded, first_loads, roots.discover() if on_disk else (), tenant, limit)

    return await asyncio.to_thread(assemble)
