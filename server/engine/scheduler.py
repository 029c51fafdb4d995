"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step: all running sequences that finished their prompt decode one token; running sequences still in their
prompt continue with a chunk; then waiting sequences are admitted in arrival order while the running limit, the
token budget (``engine.max_batch_tokens``) and the KV cache allow. A sequence joins at a step boundary and leaves
the moment it finishes, so a short request never waits for a long one.

Admission needs three things: the adapter in memory (a sequence whose adapter is still loading is skipped, not
waited for), a device slot for it (idle adapters are evicted), and a KV region of ``prompt + max_new_tokens``.
Adapters are looked up (read from disk if need be) only for the next ``max_running`` waiting sequences, not when a
request arrives: a deep queue of requests for distinct adapters would otherwise read them all at once and evict
each other's from the host cache before they run. When
the KV cache is the obstacle, admission stops there (first come, first served); when only fragmentation is, the
cache is compacted first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from itertools import islice

from loraplex.server.config import EngineSettings
from loraplex.server.engine.errors import AdapterNotFound, EngineError
from loraplex.server.engine.kv_cache import KVCache
from loraplex.server.engine.sequence import Sequence, Status
from loraplex.server.lora.cache import AdapterManager, AdapterVersion, Retired


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # rows this step: a prompt chunk, or 1 for decode

    @property
    def samples(self) -> bool:
        """Whether the step ends with a new token for this sequence."""
        return self.seq.num_computed + self.num_tokens >= self.seq.total_len


class Scheduler:
    def __init__(self, settings: EngineSettings, kv: KVCache, adapters: AdapterManager) -> None:
        self.settings = settings
        self.kv = kv
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @staticmethod
    def resolve_adapter(seq: Sequence) -> AdapterVersion | None:
        """The waiting sequence's adapter version once its lookup is done; raises the load's error, or
        AdapterNotFound if the adapter was unloaded meanwhile."""
        if seq.adapter is None and seq.adapter_future is not None and seq.adapter_future.done():
            seq.adapter = seq.adapter_future.result()
        if seq.adapter is not None and seq.adapter.retired is Retired.UNLOADED:
            raise AdapterNotFound(f"adapter '{seq.adapter.adapter_id}' was unloaded while the request waited")
        return seq.adapter

    def _start_lookups(self, failed: list[tuple[Sequence, EngineError]]) -> None:
        """Starts the adapter lookups of the next ``max_running`` waiting sequences that have none yet."""
        for seq in list(islice(self.waiting, self.settings.max_running)):
            if seq.request.adapter_id and seq.adapter is None and seq.adapter_future is None:
                try:
                    seq.adapter_future = self.adapters.lookup(seq.request.adapter_id)
                except EngineError as error:  # unloaded (or its directory gone) since the request arrived
                    failed.append((seq, error))

    def _adapter_ready(self, seq: Sequence) -> bool:
        """Whether the sequence's adapter is on the device (placing it if possible); raises when it cannot be."""
        if not seq.request.adapter_id:
            return True
        if seq.adapter_future is None:
            return False  # its lookup starts once it is among the next waiting sequences
        version = self.resolve_adapter(seq)
        if version is None:
            return False
        adapter_id = version.adapter_id
        if version.retired is Retired.REPLACED or (version.weights is None and version.placement is None):
            # Not started yet: take the current version (after a replace) or reload it (after eviction).
            seq.adapter, seq.adapter_future = None, self.adapters.lookup(adapter_id)
            return False
        return self.adapters.make_resident(version)

    def _allocate_region(self, length: int) -> bool:
        allocator = self.kv.allocator
        if allocator.largest_free >= length:
            return True
        if allocator.free_tokens < length:
            return False
        moved = self.kv.compact([seq.region for seq in self.running if seq.region is not None])
        holders = [seq for seq in self.running if seq.region is not None]
        for seq, region in zip(holders, moved, strict=True):
            seq.region = region
        return allocator.largest_free >= length

    def schedule(self) -> tuple[list[ScheduledChunk], list[tuple[Sequence, EngineError]]]:
        """The next step's chunks, and waiting sequences that failed (their adapter cannot be served); those stay
        in ``waiting`` until the engine fails them through ``remove``."""
        budget = self.settings.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.running:
            if not seq.prefilling:
                chunks.append(ScheduledChunk(seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.prefilling and budget > 0:
                take = min(len(seq.prompt_ids) - seq.num_computed, budget)
                chunks.append(ScheduledChunk(seq, take))
                budget -= take
        failed: list[tuple[Sequence, EngineError]] = []
        self._start_lookups(failed)
        now = time.monotonic()
        for seq in list(self.waiting):
            if len(self.running) >= self.settings.max_running or budget <= 0:
                break
            try:
                ready = self._adapter_ready(seq)
            except EngineError as error:
                failed.append((seq, error))
                continue
            if not ready:
                continue
            if not self._allocate_region(seq.reserved_len):
                break
            seq.region = self.kv.allocator.allocate(seq.reserved_len)
            if seq.adapter is not None:
                self.adapters.acquire(seq.adapter)
            seq.status = Status.RUNNING
            seq.scheduled_at = now
            self.waiting.remove(seq)
            self.running.append(seq)
            take = min(len(seq.prompt_ids), budget)
            chunks.append(ScheduledChunk(seq, take))
            budget -= take
        return chunks, failed

    def remove(self, seq: Sequence, served: bool) -> None:
        """Takes a sequence out (finished, failed or cancelled) and frees what it holds."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            if seq.region is not None:
                self.kv.allocator.free(seq.region)
                seq.region = None
            if seq.adapter is not None:
                self.adapters.release(seq.adapter, served)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
