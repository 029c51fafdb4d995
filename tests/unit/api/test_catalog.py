"""The adapter listing of ListAdapters and RepositoryIndex, over a real adapter root and a stand-in engine: what
it joins, what a tenant sees and counts, what a cut keeps, and changed files."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from loraplex.server.api.auth import OPEN_ACCESS, Tenant
from loraplex.server.api.catalog import Listing, adapter_listing
from loraplex.server.core.types import AdapterInfo, ResidencyTier
from loraplex.server.lora.format import CONFIG_FILE
from loraplex.server.lora.sources import AdapterRoots, files_signature

if TYPE_CHECKING:
    from loraplex.server.engine.engine import Engine


@dataclass
class FakeEngine:
    """The two calls the listing makes."""

    loaded: list[AdapterInfo] = field(default_factory=list)
    loading: frozenset[str] = frozenset()

    def first_loads(self) -> frozenset[str]:
        return self.loading

    def list_adapters(self) -> list[AdapterInfo]:
        return self.loaded


def _on_disk(root: Path, *adapter_ids: str) -> None:
    for adapter_id in adapter_ids:
        (root / adapter_id).mkdir(parents=True)
        (root / adapter_id / CONFIG_FILE).write_text("{}")


def _info(root: Path, adapter_id: str, tier: ResidencyTier, pinned: bool = False) -> AdapterInfo:
    directory = root / adapter_id
    return AdapterInfo(
        adapter_id=adapter_id,
        version=1,
        content_hash="ab" * 32,
        rank=8,
        target_modules=("q_proj",),
        use_dora=False,
        size_bytes=1024,
        tier=tier,
        pinned=pinned,
        loaded_at=0.0,
        requests_served=0,
        source_dir=str(directory),
        files_signature=files_signature(directory),
    )


def _list(engine: FakeEngine, root: Path, limit: int, tenant: Tenant = OPEN_ACCESS, on_disk: bool = True) -> Listing:
    listing = adapter_listing(cast("Engine", engine), AdapterRoots.of([root]), tenant, limit, on_disk=on_disk)
    return asyncio.run(listing)


def _ids(listing: Listing) -> list[str]:
    return [listed.adapter_id for listed in listing.adapters]


def test_a_cut_keeps_pinned_then_in_memory_then_loaded_once_or_loading_then_disk(tmp_path: Path) -> None:
    _on_disk(tmp_path, "a-disk", "b-pinned", "c-device", "d-evicted", "e-loading", "f-host", "g-disk")
    engine = FakeEngine(
        loaded=[
            _info(tmp_path, "b-pinned", ResidencyTier.DEVICE, pinned=True),
            _info(tmp_path, "c-device", ResidencyTier.DEVICE),
            _info(tmp_path, "d-evicted", ResidencyTier.DISK),  # loaded once, evicted from both tiers
            _info(tmp_path, "f-host", ResidencyTier.HOST),
        ],
        loading=frozenset({"e-loading"}),
    )
    full = _list(engine, tmp_path, 100)
    assert _ids(full) == ["a-disk", "b-pinned", "c-device", "d-evicted", "e-loading", "f-host", "g-disk"]
    assert (full.total, full.truncated) == (7, False)
    tiers = [listed.tier.value for listed in full.adapters]
    assert tiers == ["disk", "device", "device", "disk", "loading", "host", "disk"]
    assert [listed.info is None for listed in full.adapters] == [True, False, False, False, True, False, True]
    kept = {
        1: ["b-pinned"],
        3: ["b-pinned", "c-device", "f-host"],
        5: ["b-pinned", "c-device", "d-evicted", "e-loading", "f-host"],
        6: ["a-disk", "b-pinned", "c-device", "d-evicted", "e-loading", "f-host"],
    }
    for limit, expected in kept.items():
        cut = _list(engine, tmp_path, limit)
        assert (_ids(cut), cut.total, cut.truncated) == (expected, 7, True), limit


def test_a_tenant_sees_and_counts_only_its_adapters(tmp_path: Path) -> None:
    _on_disk(tmp_path, "a/one", "a/two", "a/three", "b/pinned", "b/two")
    engine = FakeEngine(loaded=[_info(tmp_path, "b/pinned", ResidencyTier.DEVICE, pinned=True)])
    team_a = Tenant("team-a", ("a/*",), (), admin=False)
    listing = _list(engine, tmp_path, 2, team_a)
    assert (_ids(listing), listing.total, listing.truncated) == (["a/one", "a/three"], 3, True)


def test_only_in_memory_without_the_disk_and_changed_files_are_marked(tmp_path: Path) -> None:
    _on_disk(tmp_path, "kept", "changed", "disk-only")
    engine = FakeEngine(
        loaded=[_info(tmp_path, "kept", ResidencyTier.HOST), _info(tmp_path, "changed", ResidencyTier.HOST)]
    )
    config = tmp_path / "changed" / CONFIG_FILE
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    listing = _list(engine, tmp_path, 100, on_disk=False)
    assert [(listed.adapter_id, listed.files_changed) for listed in listing.adapters] == [
        ("changed", True),
        ("kept", False),
    ]
    assert listing.total == 2
