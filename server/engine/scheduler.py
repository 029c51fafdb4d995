"""Continuous batching: which sequences run in the next step, and how many tokens each, on the paged KV cache.

Every step, in this order:

1. **Decode**: every running sequence past its prompt decodes one token, oldest first. One whose next token needs a
   new KV block takes one; when none is free, the *newest* running sequence is preempted (its blocks go back, it
   returns to the front of the queue and recomputes prompt + output when it resumes, emitting no token twice)
   until the block is there. A sequence that is itself the newest is the one preempted.
2. **Prefill**: running sequences with tokens still to compute (a prompt, or a resumed sequence's recomputation)
   take a chunk within the token budget (``engine.max_batch_tokens``), as large as the free blocks allow. This
   pass never preempts, except when nothing else could run this step (then the newest sequences make room, so the
   oldest always progresses: a lone sequence always fits, see ``EngineSettings``).
3. **Admission**: waiting sequences, in arrival order (preempted ones first; with several tenants, the tenant with
   the lowest virtual token counter first, see :mod:`.fairness`), join while the running limit, the token budget and
   the KV blocks allow (with several tenants, one under its slot share of a full batch reclaims a slot from the
   tenant most over its share, preempting that tenant's newest sequence): a newcomer needs blocks for its first chunk
   and leaves a small reserve (``1%`` of the blocks) for the running sequences' next tokens, so admitting does not
   force a preemption on the next step. With ``engine.prefix_cache`` on, a newcomer first takes the cached blocks of
   its longest cached prompt prefix (:mod:`.prefix` keys them; at least its last prompt token is left to compute, for
   its logits) and its first chunk starts past them; after each step, sequences publish the prompt blocks they
   filled. It needs its adapter in memory and on the device too (a sequence whose adapter is still loading is
   skipped, not waited for). Adapters are looked up (read from disk if need be) only for the next ``max_running``
   waiting sequences, not when a request arrives: a deep queue of requests for distinct adapters would otherwise read
   them all at once and evict each other's from the host cache before they run.
4. **Prefetch** (:meth:`Scheduler.prefetch`, after the step's tokens went out): the adapters of the next
   ``engine.adapter_prefetch`` waiting sequences that are in host memory are placed on the device where that is one
   slot write, so the step that admits them does not pay their host → device copy.

A sequence joins at a step boundary and leaves the moment it finishes, so a short request never waits for a long
one. A preempted sequence keeps its adapter reference (and so its device slot): it resumes without a new lookup.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from loraplex.server.config import EngineSettings
from loraplex.server.core.errors import AdapterNotFound, EngineError
from loraplex.server.engine.fairness import TenantShare
from loraplex.server.engine.prefix import block_keys, root_key
from loraplex.server.engine.sequence import Sequence, Status
from loraplex.server.lora.cache import AdapterManager, AdapterVersion, Retired
from loraplex.server.model.kv_cache import KVCache


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
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.preempted_tokens: list[int] = []  # computed tokens each preemption of the last schedule() gave back
        self.prefix_lookups: list[tuple[int, int]] = []  # (prompt tokens, cached tokens) per admission of the last
        self.prefix_evictions = 0  # idle cached blocks the last schedule() evicted
        self.share = TenantShare()

    def add(self, seq: Sequence) -> None:
        self.share.arrived(_tenant(seq), seq.request.tenant_weight)
        self.waiting.append(seq)

    @property
    def _fair(self) -> bool:
        """Whether tenants are weighed: fair share on and more than one tenant live."""
        return self.settings.fair_share and self.share.tenants > 1

    def _queue_order(self) -> list[Sequence]:
        """Waiting sequences in admission order: preempted ones first, in arrival order; with several tenants, by
        their tenant's counter (the lowest first), then preempted ones first, then arrival order."""
        if not self._fair:
            return list(self.waiting)
        return sorted(self.waiting, key=lambda seq: (self.share.level(_tenant(seq)), not seq.preemptions))

    @staticmethod
    def resolve_adapter(seq: Sequence) -> AdapterVersion | None:
        """The waiting sequence's adapter version once its lookup is done; raises the load's error, or
        AdapterNotFound if the adapter was unloaded meanwhile."""
        if seq.adapter is None and seq.adapter_future is not None and seq.adapter_future.done():
            seq.adapter = seq.adapter_future.result()
        if seq.adapter is not None and not seq.adapter_acquired and seq.adapter.retired is Retired.UNLOADED:
            raise AdapterNotFound(f"adapter '{seq.adapter.adapter_id}' was unloaded while the request waited")
        return seq.adapter

    def _start_lookups(self, order: list[Sequence], failed: list[tuple[Sequence, EngineError]]) -> None:
        """Starts the adapter lookups of the next ``max_running`` waiting sequences that have none yet."""
        for seq in order[: self.settings.max_running]:
            if seq.request.adapter_id and seq.adapter is None and seq.adapter_future is None:
                try:
                    seq.adapter_future = self.adapters.lookup(seq.request.adapter_id)
                except EngineError as error:  # unloaded (or its directory gone) since the request arrived
                    failed.append((seq, error))

    def _adapter_ready(self, seq: Sequence) -> bool:
        """Whether the sequence holds its adapter on the device (placing it and taking a reference if possible);
        raises when it cannot be served."""
        if not seq.request.adapter_id or seq.adapter_acquired:
            return True  # the base model, or a preempted sequence that kept its adapter (and its slot)
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
        seq.adapter_acquired = self.adapters.acquire_resident(version)
        return seq.adapter_acquired

    def _drop_adapter(self, seq: Sequence, served: bool = False) -> None:
        """Gives back the sequence's adapter reference (and so, maybe, its device slot), if it holds one."""
        if seq.adapter is not None and seq.adapter_acquired:
            self.adapters.release(seq.adapter, served)
            seq.adapter_acquired = False

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Gives ``seq`` the blocks its next ``tokens`` need; False (nothing taken) when too few are free."""
        missing = self.kv.blocks_for(seq.num_computed + tokens) - len(seq.blocks)
        if missing <= 0:
            return True
        blocks = self.kv.allocator.allocate(missing)
        if blocks is None:
            return False
        seq.blocks += blocks
        return True

    def _free_tokens(self, seq: Sequence) -> int:
        """Tokens ``seq`` could compute next with its own blocks and all free ones."""
        return (len(seq.blocks) + self.kv.allocator.num_free) * self.kv.block_size - seq.num_computed

    def _preempt(self, seq: Sequence) -> None:
        """Takes back a running sequence's blocks; it waits at the front of the queue to recompute."""
        self.running.remove(seq)
        self.preempted_tokens.append(seq.num_computed)
        self._release_blocks(seq)
        seq.preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, tokens: int) -> bool:
        """Preempts the newest running sequences until ``seq`` has blocks for ``tokens``; False when ``seq`` was
        the newest and was preempted itself."""
        while not self._grow(seq, tokens):
            victim = self._victim(seq)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, seq: Sequence) -> Sequence:
        """Whom to preempt so that ``seq`` gets blocks: among ``seq`` and the running sequences after it (none of
        them scheduled yet this step), the newest of the tenant with the highest counter."""
        if not self._fair:
            return self.running[-1]
        candidates = self.running[self.running.index(seq) :]
        return max(reversed(candidates), key=lambda other: self.share.level(_tenant(other)))

    def _reclaim_victim(self, seq: Sequence) -> Sequence | None:
        """The running sequence to preempt so that waiting ``seq`` gets a slot of the full batch: when its tenant
        runs fewer sequences than its slot share, the newest of the highest-counter tenant over its own share
        whose counter is not below ``seq``'s tenant's; None when there is none (or fair share is off)."""
        if not self._fair:
            return None
        slots = self.settings.max_running
        running = Counter(_tenant(other) for other in self.running)
        tenant = _tenant(seq)
        if running[tenant] >= self.share.slot_share(tenant, slots):
            return None
        level = self.share.level(tenant)
        over = [
            other
            for other in self.running
            if running[_tenant(other)] > self.share.slot_share(_tenant(other), slots)
            and self.share.level(_tenant(other)) >= level
        ]
        return max(reversed(over), key=lambda other: self.share.level(_tenant(other)), default=None)

    def _reclaim(self, victim: Sequence, chunks: list[ScheduledChunk]) -> int:
        """Preempts ``victim`` for a fair-share admission, dropping its chunk of this step; the tokens given back."""
        given = sum(chunk.num_tokens for chunk in chunks if chunk.seq is victim)
        chunks[:] = [chunk for chunk in chunks if chunk.seq is not victim]
        self._preempt(victim)
        return given

    def _decode(self, chunks: list[ScheduledChunk]) -> None:
        for seq in list(self.running):  # oldest first; preemption only ever takes newer ones (or seq itself)
            if seq.status is Status.RUNNING and not seq.prefilling and self._make_room(seq, 1):
                chunks.append(ScheduledChunk(seq, 1))

    def _prefill(self, chunks: list[ScheduledChunk], budget: int) -> int:
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING or not seq.prefilling:
                continue
            take = min(seq.pending, budget, self._free_tokens(seq))
            if take <= 0 and not chunks:  # nothing else runs this step: newer sequences make room
                take = min(seq.pending, budget, self.kv.block_size)
                if not self._make_room(seq, take):
                    break
            if take <= 0 or not self._grow(seq, take):
                continue
            chunks.append(ScheduledChunk(seq, take))
            budget -= take
        return budget

    def _release_blocks(self, seq: Sequence) -> None:
        """Drops the sequence's block references (tail first: its deepest cached blocks are evicted first) and its
        prefix keys (they name its adapter version, which a sequence that is not running may still change)."""
        self.kv.allocator.free(reversed(seq.blocks))
        seq.blocks = []
        seq.num_computed = 0
        seq.prefix_keys = None
        seq.num_published = 0

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Starts a sequence with nothing computed on the cached blocks of its longest cached prompt prefix,
        leaving at least its last token to compute; the tokens reused."""
        if not self.settings.prefix_cache or seq.num_computed:
            return 0
        if seq.prefix_keys is None:  # the adapter version it runs with is known from here on
            root = root_key(
                self.adapters.base_fingerprint or "",
                seq.adapter,
                seq.request,
                self.settings.prefix_cache_share_tenants,
            )
            seq.prefix_keys = block_keys(root, seq.prompt_ids, self.kv.block_size)
        usable = min(len(seq.prefix_keys), (seq.total_len - 1) // self.kv.block_size)
        hits = self.kv.allocator.lookup(seq.prefix_keys[:usable])
        self.kv.allocator.share(hits)
        seq.blocks = hits
        seq.num_published = len(hits)
        seq.num_computed = len(hits) * self.kv.block_size
        return seq.num_computed

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Takes the blocks of ``seq``'s first chunk (after its cached prefix) and returns its tokens; 0 (nothing
        taken) when too few are free beside the reserve."""
        reused = self._reuse_prefix(seq)
        take = min(seq.pending, budget)
        reserve = max(1, self.kv.num_blocks // 100) if self.running else 0
        missing = self.kv.blocks_for(seq.num_computed + take) - len(seq.blocks)
        if missing + reserve > self.kv.allocator.num_free or not self._grow(seq, take):
            self._release_blocks(seq)
            return 0
        if self.settings.prefix_cache:
            self.prefix_lookups.append((len(seq.prompt_ids), reused))
        return take

    def computed(self, seq: Sequence, tokens: int) -> None:
        """After a step that computed ``tokens`` of ``seq``: charges its tenant and publishes its prompt blocks
        that are now full."""
        self.share.charge(_tenant(seq), tokens, seq.request.tenant_weight)
        keys = seq.prefix_keys
        if keys is None:
            return
        full = min(len(keys), seq.num_computed // self.kv.block_size)
        for index in range(seq.num_published, full):
            self.kv.allocator.publish(seq.blocks[index], keys[index])
        seq.num_published = max(seq.num_published, full)

    def schedule(self) -> tuple[list[ScheduledChunk], list[tuple[Sequence, EngineError]]]:
        """The next step's chunks, and waiting sequences that failed (their adapter cannot be served); those stay
        in ``waiting`` until the engine fails them through ``remove``."""
        chunks: list[ScheduledChunk] = []
        self.preempted_tokens = []
        self.prefix_lookups = []
        evictions = self.kv.allocator.evictions
        self._decode(chunks)
        budget = self._prefill(chunks, self.settings.max_batch_tokens - len(chunks))
        failed: list[tuple[Sequence, EngineError]] = []
        order = self._queue_order()
        self._start_lookups(order, failed)
        now = time.monotonic()
        short_of_blocks = bool(self.preempted_tokens)  # admitting would only hand the freed blocks back and forth
        for seq in order:
            if budget <= 0 or short_of_blocks:
                break
            full = len(self.running) >= self.settings.max_running
            if full and not self._fair:
                break
            if full and self._reclaim_victim(seq) is None:
                continue  # another tenant's sequence further on may be under its share
            try:
                ready = self._adapter_ready(seq)
            except EngineError as error:
                failed.append((seq, error))
                continue
            if not ready:
                continue
            victim = self._reclaim_victim(seq) if full else None
            if victim is not None:
                budget += self._reclaim(victim, chunks)
            take = self._admit(seq, budget)
            if not take:
                self._drop_adapter(seq)
                break
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = now
            self.waiting.remove(seq)
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, take))
            budget -= take
        self.prefix_evictions = self.kv.allocator.evictions - evictions
        return chunks, failed

    def prefetch(self) -> int:
        """Places the adapters of the next ``adapter_prefetch`` waiting sequences whose lookup is done ahead of
        their admission (a free or own-pool idle slot only, never evicting what a sequence holds); the count
        placed now."""
        placed = 0
        for seq in self._queue_order()[: self.settings.adapter_prefetch]:
            version, future = seq.adapter, seq.adapter_future
            if version is None and future is not None and future.done() and future.exception() is None:
                version = future.result()
            if version is not None and not seq.adapter_acquired and version.placement is None:
                placed += self.adapters.prefetch(version)
        return placed

    def remove(self, seq: Sequence, served: bool) -> None:
        """Takes a sequence out (finished, failed or cancelled) and frees what it holds."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        if seq.blocks:
            self._release_blocks(seq)
        self._drop_adapter(seq, served)
        self.share.left(_tenant(seq))
        seq.status = Status.FINISHED

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)


def _tenant(seq: Sequence) -> str:
    return seq.request.tenant or ""
