"""Adapter lifecycle: ids and versions, loading from disk, the host LRU, device residency, pinning, unloading.

Tiers: *disk* (a directory under an adapter root) → *host* (validated ``AdapterWeights`` in memory, LRU within
``adapters.host_bytes``) → *device* (a slot in a :class:`DeviceSlots` pool, within ``adapters.device_slots`` and
``adapters.device_bytes``). Reading from disk runs on loader threads, so a request whose adapter is not resident
waits while every other request keeps generating.

Device eviction: the idle adapters on the device (placed, unreferenced, unpinned) are kept in one LRU per pool,
updated in O(1) on every acquire and release. Pools are preallocated (:mod:`loraplex.server.lora.pool`), so a
version takes a free slot of its pool, else the slot of the least recently used idle adapter *of its own pool*
(one slot write either way); only when its pool has neither does its pool grow into free bytes, the other pools
give bytes back (:meth:`DeviceSlots.reclaim`), or the least recently used idle adapter of any pool is evicted.
Pinned adapters are tracked in their own set, so the per-step pass that places them never scans every adapter.
:meth:`AdapterManager.prefetch` places the adapters of waiting requests ahead of their admission on the cheap
path only (a free slot or its own pool's idle LRU head, never a reallocation), so admission finds them resident.

Host tier: the current versions holding host weights are kept in two LRUs (placed ones, whose device copy serves,
and host-only ones), updated in O(1) on every use; trimming to ``adapters.host_bytes`` drops the least recently
used placed versions' host weights first, then host-only ones, never sorting.

Versions: loaded weights are immutable. Loading an id whose files changed creates a new :class:`AdapterVersion`;
running sequences keep the version they hold (reference counts), new requests get the new one, and the old
version's slot is freed when its last sequence finishes. ``unload`` takes the id out of service (requests get
AdapterNotFound until it is loaded again). Device placement, eviction and compaction happen on the engine thread
only (between steps); everything else is safe from any thread under one lock. A sequence takes its reference in
the same locked step that makes its version resident (:meth:`AdapterManager.acquire_resident`), so a retirement on
another thread can never free a slot a sequence is about to run on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from loraplex.server.core.errors import AdapterNotFound, AdapterRejected, EngineError, InvalidRequest
from loraplex.server.core.events import EngineListener
from loraplex.server.core.shape import ModelShape
from loraplex.server.core.types import AdapterInfo, ResidencyTier
from loraplex.server.lora import format as peft_format
from loraplex.server.lora.format import AdapterLimits, AdapterWeights
from loraplex.server.lora.pool import DeviceSlots, DoraScales, Placement, PoolKey
from loraplex.server.lora.sources import (
    AdapterDirectoryMissing,
    AdapterOutsideRoot,
    AdapterRoots,
    InvalidAdapterId,
    StoreCost,
    files_signature,
    validate_adapter_id,
)

log = logging.getLogger(__name__)

DoraScalesFn = Callable[[AdapterWeights], DoraScales | None]


class Retired(StrEnum):
    REPLACED = "replaced"
    UNLOADED = "unloaded"


@dataclass(eq=False)
class AdapterVersion:
    """One immutable version of an adapter and where it currently lives."""

    adapter_id: str
    version: int
    content_hash: str
    rank: int
    target_modules: tuple[str, ...]
    use_dora: bool
    size_bytes: int
    source_dir: Path
    files: tuple[int, ...]  # files_signature of source_dir when this version was last read
    loaded_at: float
    manifest: dict[str, Any] | None
    weights: AdapterWeights | None = field(repr=False)
    dora_scales: DoraScales | None = field(default=None, repr=False)
    placement: Placement | None = field(default=None, repr=False)
    refs: int = 0
    requests_served: int = 0
    last_used: float = 0.0
    retired: Retired | None = None


@dataclass(eq=False)
class _Entry:
    adapter_id: str
    current: AdapterVersion | None = None
    pinned: bool = False
    unloaded: bool = False
    loading: Future[AdapterVersion] | None = None
    rejected: tuple[tuple[int, ...], EngineError] | None = None
    next_version: int = 1


class AdapterManager:
    """Registry + host LRU + device residency of all adapters."""

    def __init__(
        self,
        roots: AdapterRoots,
        shape: ModelShape,
        limits: AdapterLimits,
        slots: DeviceSlots,
        host_bytes: int,
        loader_threads: int,
        base_fingerprint: str | None = None,
        dora_scales_fn: DoraScalesFn | None = None,
        listener: EngineListener | None = None,
        store_cost: StoreCost | None = None,
    ) -> None:
        self.roots = roots
        self.store_cost = store_cost or StoreCost()  # default: local files, no extra wait
        self.listener = listener or EngineListener()
        self.shape = shape
        self.limits = limits
        self.slots = slots
        self.host_bytes = host_bytes
        self.base_fingerprint = base_fingerprint
        self._dora_scales_fn = dora_scales_fn
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._retired: list[AdapterVersion] = []
        # Evictable versions on the device (current, unreferenced, unpinned) per pool, least recently used first:
        # eviction takes the head in O(1), and an adapter evicts one of its own pool before any pool is resized.
        self._idle: dict[PoolKey, OrderedDict[AdapterVersion, None]] = {}
        self._pinned: set[str] = set()
        # Current versions with host weights, least recently used first, and their sizes: placed ones (dropped
        # first: their device copy serves) and host-only ones. _host_total is the sum over both.
        self._host_placed: OrderedDict[AdapterVersion, int] = OrderedDict()
        self._host_only: OrderedDict[AdapterVersion, int] = OrderedDict()
        self._host_total = 0
        self._executor = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-loader")
        self._load_listeners: list[Callable[[], None]] = []

    # ----------------------------------------------------------------------------------------------- lookups

    def add_load_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs (on a loader thread) after every finished load, to wake the engine."""
        self._load_listeners.append(listener)

    def _entry(self, adapter_id: str) -> _Entry:
        entry = self._entries.get(adapter_id)
        if entry is None:
            entry = self._entries[adapter_id] = _Entry(adapter_id)
        return entry

    def _directory(self, adapter_id: str) -> Path:
        try:
            return self.roots.resolve(adapter_id)
        except InvalidAdapterId as exc:
            raise InvalidRequest(str(exc)) from exc
        except AdapterOutsideRoot as exc:
            raise AdapterRejected(str(exc)) from exc
        except AdapterDirectoryMissing as exc:
            raise AdapterNotFound(str(exc)) from exc

    def _servable_entry(self, adapter_id: str) -> _Entry | None:
        """The entry of ``adapter_id`` (None if never seen); raises for a bad id or an unloaded adapter."""
        try:
            validate_adapter_id(adapter_id)
        except InvalidAdapterId as exc:
            raise InvalidRequest(str(exc)) from exc
        entry = self._entries.get(adapter_id)
        if entry is not None and entry.unloaded:
            raise AdapterNotFound(f"adapter '{adapter_id}' was unloaded; load it again to serve it")
        return entry

    def check(self, adapter_id: str) -> None:
        """Raises at once what ``lookup`` would (bad id, no such adapter, unloaded) without loading anything, so a
        request for a missing adapter is refused when it arrives, however long the queue before its lookup."""
        with self._lock:
            entry = self._servable_entry(adapter_id)
            if entry is not None and entry.current is not None:
                return
        self._directory(adapter_id)

    def lookup(self, adapter_id: str) -> Future[AdapterVersion]:
        """The serving version of ``adapter_id``: done at once when in memory, else after a load from disk.

        Raises InvalidRequest (bad id) or AdapterNotFound (no such directory, or unloaded) synchronously;
        the future fails with AdapterRejected when the files cannot be served. Reports the request's host and
        device look-ups to the listener.
        """
        with self._lock:
            entry = self._servable_entry(adapter_id)
            current = entry.current if entry is not None else None
            in_memory = current is not None and (current.weights is not None or current.placement is not None)
            # Both tiers are judged here, before any load or prefetch this request could cause: a device hit is a
            # request whose adapter already sat in a slot, not one that its own prefetch placed while it waited.
            self.listener.adapter_lookup("host", in_memory)
            self.listener.adapter_lookup("device", current is not None and current.placement is not None)
            if current is not None and in_memory:
                done: Future[AdapterVersion] = Future()
                done.set_result(current)
                return done
            if entry is not None and entry.loading is not None:
                return entry.loading
            directory = self._directory(adapter_id)
            return self._start_load(self._entry(adapter_id), directory)

    # ----------------------------------------------------------------------------------------------- loading

    def _start_load(self, entry: _Entry, directory: Path) -> Future[AdapterVersion]:
        signature = files_signature(directory)
        if entry.rejected is not None and entry.rejected[0] == signature:
            failed: Future[AdapterVersion] = Future()
            failed.set_exception(entry.rejected[1])
            return failed
        future: Future[AdapterVersion] = Future()
        entry.loading = future
        self._executor.submit(self._load, entry, directory, signature, future)
        return future

    def _read(self, adapter_id: str, directory: Path) -> tuple[AdapterWeights, DoraScales | None]:
        weights = peft_format.read_adapter(adapter_id, directory, self.shape, self.limits, self.base_fingerprint)
        if not self.slots.fits_at_all(weights):
            raise peft_format.AdapterRejected(
                adapter_id,
                [
                    f"needs {self.slots.slot_bytes(weights)} bytes of device memory, more than the whole adapter "
                    f"budget of {self.slots.max_bytes} (adapters.device_bytes)"
                ],
            )
        dora = self._dora_scales_fn(weights) if weights.use_dora and self._dora_scales_fn else None
        return weights, dora

    def _load(self, entry: _Entry, directory: Path, signature: tuple[int, ...], future: Future[AdapterVersion]) -> None:
        started = time.perf_counter()
        outcome: Literal["ok", "rejected", "error"] = "ok"
        time.sleep(self.store_cost.wait_s(directory))  # on a loader thread: the engine keeps stepping
        try:
            weights, dora = self._read(entry.adapter_id, directory)
        except peft_format.AdapterRejected as exc:
            outcome = "rejected"
            self._finish_load(entry, future, signature, error=AdapterRejected(str(exc)))
        except Exception as exc:  # a loader thread must never die silently: the request gets the reason
            outcome = "error"
            log.exception("loading adapter %s failed", entry.adapter_id)
            reason = AdapterRejected(f"adapter '{entry.adapter_id}' could not be loaded: {exc}")
            self._finish_load(entry, future, signature, error=reason)
        else:
            self._finish_load(entry, future, signature, weights=weights, dora=dora)
        elapsed = time.perf_counter() - started
        self.listener.adapter_loaded("host", outcome, elapsed)
        log.info("adapter %s: %s after %.1f ms", entry.adapter_id, outcome, elapsed * 1e3)
        for listener in self._load_listeners:
            listener()

    def _finish_load(
        self,
        entry: _Entry,
        future: Future[AdapterVersion],
        signature: tuple[int, ...],
        weights: AdapterWeights | None = None,
        dora: DoraScales | None = None,
        error: EngineError | None = None,
    ) -> None:
        with self._lock:
            if entry.loading is future:
                entry.loading = None
            if entry.unloaded:
                error = AdapterNotFound(f"adapter '{entry.adapter_id}' was unloaded while it was loading")
            if error is not None or weights is None:
                assert error is not None
                if isinstance(error, AdapterRejected):
                    entry.rejected = (signature, error)
                future.set_exception(error)
                return
            entry.rejected = None
            version = self._install(entry, weights, dora, signature)
            self._trim_host()
        future.set_result(version)

    def _install(
        self, entry: _Entry, weights: AdapterWeights, dora: DoraScales | None, signature: tuple[int, ...]
    ) -> AdapterVersion:
        current = entry.current
        if current is not None and current.content_hash == weights.content_hash:
            if current.weights is None and current.placement is None:
                current.weights, current.dora_scales = weights, dora
                self._refresh_host(current)
            current.files = signature  # same content under new file times: nothing left to read
            return current
        version = AdapterVersion(
            adapter_id=entry.adapter_id,
            version=entry.next_version,
            content_hash=weights.content_hash,
            rank=weights.rank,
            target_modules=tuple(sorted(weights.target_modules)),
            use_dora=weights.use_dora,
            size_bytes=weights.nbytes,
            source_dir=weights.source_dir,
            files=signature,
            loaded_at=time.time(),
            manifest=dict(weights.manifest) if weights.manifest else None,
            weights=weights,
            dora_scales=dora,
            last_used=time.monotonic(),
        )
        entry.next_version += 1
        if current is not None:
            self._retire(current, Retired.REPLACED)
        entry.current = version
        self._refresh_host(version)
        return version

    def _retire(self, version: AdapterVersion, reason: Retired) -> None:
        version.retired = reason
        self._refresh_idle(version)
        self._refresh_host(version)
        self._retired.append(version)
        self._free_retired()

    def _free_retired(self) -> None:
        keep: list[AdapterVersion] = []
        for version in self._retired:
            if version.refs > 0:
                keep.append(version)
                continue
            if version.placement is not None:
                self.slots.release(version.placement)
                version.placement = None
            version.weights = None
        self._retired = keep

    def _refresh_host(self, version: AdapterVersion) -> None:
        """Puts ``version`` at the recent end of its host LRU if it is current and holds host weights, else takes it
        out; called after every use and every change to its weights, placement or retirement."""
        size = self._host_placed.pop(version, None)
        if size is None:
            size = self._host_only.pop(version, None)
        if size is not None:
            self._host_total -= size
        if version.weights is not None and version.retired is None:
            (self._host_only if version.placement is None else self._host_placed)[version] = version.size_bytes
            self._host_total += version.size_bytes

    def _trim_host(self) -> None:
        """Drops host weights, least recently used first (placed versions before host-only ones), until the held
        versions fit ``adapters.host_bytes``; a host-only version a sequence holds is kept."""
        for lru in (self._host_placed, self._host_only):
            kept: list[AdapterVersion] = []
            while self._host_total > self.host_bytes and lru:
                version, size = lru.popitem(last=False)
                self._host_total -= size
                if version.placement is None and version.refs > 0:
                    kept.append(version)
                    continue
                version.weights = None
                version.dora_scales = None
                self.listener.adapter_evicted("host")
            for version in kept:
                self._refresh_host(version)

    # ------------------------------------------------------------------------------------- engine thread only

    def release(self, version: AdapterVersion, served: bool) -> None:
        with self._lock:
            version.refs -= 1
            version.last_used = time.monotonic()
            if served:
                version.requests_served += 1
            if version.retired is not None:
                self._free_retired()
            else:
                self._refresh_idle(version)
                self._refresh_host(version)

    def acquire_resident(self, version: AdapterVersion) -> bool:
        """Puts ``version`` in a device slot (evicting idle adapters if needed) and takes a reference to it, in one
        step under the lock; False (nothing taken) when it must wait or was retired meanwhile.

        One step, because another thread may retire the version at any moment (an unload, or a replace finishing
        on a loader thread): a version placed but not yet referenced would lose its slot, and the sequence would
        run on the base model alone. Once referenced, the version keeps its slot until :meth:`release`.
        """
        with self._lock:
            if version.retired is not None or not self._make_resident(version):
                return False
            version.refs += 1
            self._refresh_idle(version)
            return True

    def _make_resident(self, version: AdapterVersion) -> bool:
        """Puts ``version`` in a device slot, evicting idle adapters if needed; False when it must wait."""
        with self._lock:
            if version.placement is not None:
                version.last_used = time.monotonic()
                self._refresh_idle(version)
                return True
            if version.weights is None or version.retired is not None:
                return False
            started = time.perf_counter()
            weights, dora = version.weights, version.dora_scales
            key = PoolKey.of(weights)
            # A free slot or its pool's least recently used idle adapter's slot (one slot write); then its pool
            # grows into free bytes, other pools give bytes back, or any pool's least recently used idle adapter goes.
            placement = self.slots.place(weights, dora, grow=False)
            while placement is None:
                if self._evict_idle(key):
                    placement = self.slots.place(weights, dora, grow=False)
                    continue
                placement = self.slots.place(weights, dora)
                if placement is None and not (self.slots.reclaim(weights) or self._evict_idle(None)):
                    return False
            version.placement = placement
            version.last_used = time.monotonic()
            self._refresh_idle(version)
            self._refresh_host(version)
            self.listener.adapter_loaded("device", "ok", time.perf_counter() - started)
            return True

    def _refresh_idle(self, version: AdapterVersion) -> None:
        """Puts ``version`` at the recent end of its pool's idle LRU if it is evictable (placed, current,
        unreferenced, unpinned), else takes it out; called after every change to one of those."""
        if version.placement is None:
            return
        idle = self._idle.setdefault(version.placement.pool.key, OrderedDict())
        entry = self._entries.get(version.adapter_id)
        if version.refs == 0 and version.retired is None and entry is not None and not entry.pinned:
            idle[version] = None
            idle.move_to_end(version)
        else:
            idle.pop(version, None)

    def _evict_idle(self, key: PoolKey | None) -> bool:
        """Evicts the least recently used idle adapter of pool ``key`` (of any pool: None); False when none."""
        if key is None:
            heads = [(next(iter(idle)).last_used, k) for k, idle in self._idle.items() if idle]
            if not heads:
                return False
            key = min(heads, key=lambda head: head[0])[1]
        idle = self._idle.get(key)
        if not idle:
            return False
        victim, _ = idle.popitem(last=False)
        assert victim.placement is not None
        self.slots.release(victim.placement)
        victim.placement = None
        self._refresh_host(victim)
        self.listener.adapter_evicted("device")
        log.debug("evicted adapter %s v%d from the device", victim.adapter_id, victim.version)
        return True

    def prefetch(self, version: AdapterVersion) -> bool:
        """Places a waiting request's ``version`` ahead of its admission if that is one slot write: a free slot of
        its pool (or a new pool within the free bytes), else the slot of its own pool's least recently used idle
        adapter. Never grows, cuts or compacts a pool, never touches a referenced or pinned adapter, takes no
        reference (the version stays idle, at the recent end of its pool's LRU). True when it is on the device."""
        with self._lock:
            if version.placement is not None:
                return True
            weights = version.weights
            if weights is None or version.retired is not None:
                return False
            started = time.perf_counter()
            placement = self.slots.place(weights, version.dora_scales, grow=False)
            if placement is None and self._evict_idle(PoolKey.of(weights)):
                placement = self.slots.place(weights, version.dora_scales, grow=False)
            if placement is None:
                return False
            version.placement = placement
            self._refresh_idle(version)
            self._refresh_host(version)
            self.listener.adapter_loaded("device", "ok", time.perf_counter() - started)
            return True

    def place_pinned(self) -> None:
        """Engine tick: pinned adapters that are in memory but not on the device get a slot if one can be made
        (a look at the pinned ones only, never a scan of every adapter)."""
        with self._lock:
            for adapter_id in self._pinned:
                current = self._entries[adapter_id].current
                if current is not None and current.placement is None:
                    self._make_resident(current)

    # ------------------------------------------------------------------------------------------------ admin

    def load(self, adapter_id: str, pin: bool | None = None) -> Future[AdapterVersion]:
        """Reads the adapter's files again (a changed file makes a new version) and optionally (un)pins it."""
        try:
            validate_adapter_id(adapter_id)
        except InvalidAdapterId as exc:
            raise InvalidRequest(str(exc)) from exc
        with self._lock:
            directory = self._directory(adapter_id)
            entry = self._entry(adapter_id)
            if pin and len(self._pinned - {adapter_id}) + 1 >= self.slots.max_slots:
                raise InvalidRequest(
                    f"cannot pin more than {self.slots.max_slots - 1} adapters (adapters.device_slots - 1 keeps "
                    "one slot for unpinned traffic); unpin one first"
                )
            entry.unloaded = False
            if pin is not None:
                self._set_pinned(entry, pin)
            if entry.loading is not None:
                return entry.loading
            entry.rejected = None
            return self._start_load(entry, directory)

    def unload(self, adapter_id: str) -> AdapterVersion:
        """Takes the id out of service. Running sequences finish on their version; waiting ones fail."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloaded or (entry.current is None and entry.loading is None):
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded")
            entry.unloaded = True
            self._set_pinned(entry, False)
            current = entry.current
            entry.current = None
            if current is None:
                raise AdapterNotFound(f"adapter '{adapter_id}' was still loading; its load was abandoned")
            self._retire(current, Retired.UNLOADED)
            return current

    def set_pinned(self, adapter_id: str, pinned: bool) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloaded or entry.current is None:
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded")
            self._set_pinned(entry, pinned)

    def _set_pinned(self, entry: _Entry, pinned: bool) -> None:
        entry.pinned = pinned
        if pinned:
            self._pinned.add(entry.adapter_id)
        else:
            self._pinned.discard(entry.adapter_id)
        if entry.current is not None:
            self._refresh_idle(entry.current)

    def _tier(self, entry: _Entry, version: AdapterVersion) -> ResidencyTier:
        if version.placement is not None:
            return ResidencyTier.DEVICE
        if version.weights is not None:
            return ResidencyTier.HOST
        return ResidencyTier.LOADING if entry.loading is not None else ResidencyTier.DISK

    def _info(self, entry: _Entry, version: AdapterVersion) -> AdapterInfo:
        return AdapterInfo(
            adapter_id=version.adapter_id,
            version=version.version,
            content_hash=version.content_hash,
            rank=version.rank,
            target_modules=version.target_modules,
            use_dora=version.use_dora,
            size_bytes=version.size_bytes,
            tier=self._tier(entry, version),
            pinned=entry.pinned,
            loaded_at=version.loaded_at,
            requests_served=version.requests_served,
            source_dir=str(version.source_dir),
            files_signature=version.files,
        )

    def current_version(self, adapter_id: str) -> AdapterVersion | None:
        """The version now serving ``adapter_id`` (None when not loaded); never loads, never notifies listeners."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            return None if entry is None or entry.unloaded else entry.current

    def info(self, adapter_id: str) -> AdapterInfo:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.unloaded or entry.current is None:
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded")
            return self._info(entry, entry.current)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [
                self._info(entry, entry.current)
                for entry in sorted(self._entries.values(), key=lambda e: e.adapter_id)
                if entry.current is not None and not entry.unloaded
            ]

    def first_loads(self) -> frozenset[str]:
        """Ids being read from disk that have no version yet (so ``infos`` does not list them)."""
        with self._lock:
            return frozenset(
                entry.adapter_id
                for entry in self._entries.values()
                if entry.current is None and entry.loading is not None and not entry.unloaded
            )

    def counts(self) -> tuple[int, int]:
        """(adapters on the device, adapters with host weights)."""
        with self._lock:
            versions = [e.current for e in self._entries.values() if e.current is not None]
            return (
                sum(1 for v in versions if v.placement is not None),
                sum(1 for v in versions if v.weights is not None),
            )

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
