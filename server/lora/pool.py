"""Device slot pools: where resident adapters' weights live, stacked so one grouped matmul serves a whole pool.

Adapters are grouped into pools by :class:`PoolKey` (rank bucket, targeted modules, DoRA). Every pool holds, per
targeted ``(module, layer)``, stacked tensors ``a [capacity, in, R]`` and ``b [capacity, R, out]``; an adapter of
rank r ≤ R fills the first r of R (zeros after), so mixed ranks cost at most 2× inside a bucket instead of padding
every adapter to the server's maximum rank, and adapters that touch only q,v never pay for the MLP.

Preallocated stacks: a pool is created at the first use of its key with the capacity the budgets allow at once
(``adapters.device_slots``, and the bytes of ``adapters.device_bytes`` no other pool holds), so placing an adapter is
one slot write into stacks that never move. A pool is reallocated (its used slots copied) only on the rare paths
that memory needs: :meth:`DeviceSlots.reclaim` cuts the free tail of *other* pools when a pool key has no room
(compaction first, so the tail is free), and a pool that is full of running adapters grows when bytes are free.
``DeviceSlots.reallocations`` counts both, for benchmarks and tests. An empty pool keeps its stacks (a key that
comes back costs no allocation) until ``reclaim`` needs its bytes.

Slot indices are separate from adapter ids; a :class:`Placement` is the (pool, slot) of one adapter version and
may move when a pool is compacted (between engine steps only). Budgets: the number of used slots
(``adapters.device_slots``) and the bytes *allocated* by all pools (``adapters.device_bytes``).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraplex.server.core.shape import TARGET_MODULES, ModelShape
from loraplex.server.lora.format import AdapterWeights

MIN_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """Smallest power of two ≥ rank, at least 8 (grouped matmuls want 16-byte aligned rows in bf16)."""
    bucket = MIN_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


@dataclass(frozen=True)
class PoolKey:
    rank: int
    modules: tuple[str, ...]  # in TARGET_MODULES order
    dora: bool

    @classmethod
    def of(cls, weights: AdapterWeights) -> PoolKey:
        modules = tuple(m for m in TARGET_MODULES if m in weights.target_modules)
        return cls(rank_bucket(weights.rank), modules, weights.use_dora)


class Placement:
    """Where one adapter version lives: ``pool`` and ``slot``. Mutable only by its pool's compaction."""

    __slots__ = ("pool", "slot")

    def __init__(self, pool: SlotPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot


DoraScales = Mapping[tuple[int, str], torch.Tensor]  # (layer, module) -> [out]


class SlotPool:
    """Stacked weights of one :class:`PoolKey` for ``capacity`` adapters, allocated once."""

    def __init__(
        self, key: PoolKey, shape: ModelShape, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.key = key
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        # a[module][layer]: [capacity, in, R]; b[module][layer]: [capacity, R, out]; dora[module][layer]: [cap, out]
        self.a: dict[str, list[torch.Tensor]] = {}
        self.b: dict[str, list[torch.Tensor]] = {}
        self.dora: dict[str, list[torch.Tensor]] = {}
        self._owners: list[Placement | None] = []
        self._free: list[int] = []
        self._reallocate(capacity)

    @staticmethod
    def bytes_per_slot(key: PoolKey, shape: ModelShape, element_size: int) -> int:
        per_layer = 0
        for module in key.modules:
            fan_in, fan_out = shape.module_dims(module)
            per_layer += key.rank * (fan_in + fan_out) + (fan_out if key.dora else 0)
        return per_layer * shape.num_layers * element_size

    @property
    def slot_bytes(self) -> int:
        return self.bytes_per_slot(self.key, self.shape, torch.empty((), dtype=self.dtype).element_size())

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def allocated_bytes(self) -> int:
        return self.capacity * self.slot_bytes

    def _new_stack(self, old: torch.Tensor | None, capacity: int, tail: tuple[int, ...], fill: float) -> torch.Tensor:
        stack = torch.full((capacity, *tail), fill, dtype=self.dtype, device=self.device)
        if old is not None:
            keep = min(capacity, old.shape[0])
            stack[:keep] = old[:keep]
        return stack

    def _reallocate(self, capacity: int) -> None:
        """New stacks of ``capacity`` slots keeping the first ones; the slots past ``capacity`` must be free."""
        if capacity < self.capacity and any(owner is not None for owner in self._owners[capacity:]):
            raise RuntimeError("cannot cut a pool over used slots; compact it first")
        rank = self.key.rank
        for module in self.key.modules:
            fan_in, fan_out = self.shape.module_dims(module)
            layers = range(self.shape.num_layers)
            old_a, old_b = self.a.get(module), self.b.get(module)
            self.a[module] = [
                self._new_stack(old_a[i] if old_a else None, capacity, (fan_in, rank), 0.0) for i in layers
            ]
            self.b[module] = [
                self._new_stack(old_b[i] if old_b else None, capacity, (rank, fan_out), 0.0) for i in layers
            ]
            if self.key.dora:
                old_d = self.dora.get(module)
                self.dora[module] = [
                    self._new_stack(old_d[i] if old_d else None, capacity, (fan_out,), 1.0) for i in layers
                ]
        if capacity >= self.capacity:
            self._owners.extend([None] * (capacity - self.capacity))
            for slot in range(self.capacity, capacity):
                heapq.heappush(self._free, slot)
        else:
            del self._owners[capacity:]
            self._free = [slot for slot in self._free if slot < capacity]
            heapq.heapify(self._free)
        self.capacity = capacity

    def grow(self, capacity: int) -> None:
        """Reallocates the stacks at a larger ``capacity`` (a copy of the used slots)."""
        if capacity <= self.capacity:
            raise ValueError(f"grow to {capacity} slots: the pool already has {self.capacity}")
        self._reallocate(capacity)

    def cut_free_tail(self) -> int:
        """Compacts, then reallocates the stacks at the used slots only; returns the slots given back."""
        freed = self.free
        if freed:
            self.compact()
            self._reallocate(self.used)
        return freed

    def take(self, weights: AdapterWeights, dora_scales: DoraScales | None) -> Placement | None:
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._write(slot, weights, dora_scales)
        placement = Placement(self, slot)
        self._owners[slot] = placement
        return placement

    def _write(self, slot: int, weights: AdapterWeights, dora_scales: DoraScales | None) -> None:
        for module in self.key.modules:
            for layer in range(self.shape.num_layers):
                a_slot, b_slot = self.a[module][layer][slot], self.b[module][layer][slot]
                found = weights.modules.get((layer, module))
                rank = 0 if found is None else found.a.shape[0]
                if found is not None:
                    a_slot[:, :rank].copy_(found.a.T)
                    b_slot[:rank].copy_(found.b.T)
                if rank < self.key.rank:  # what a previous adapter of a larger rank left there
                    a_slot[:, rank:].zero_()
                    b_slot[rank:].zero_()
                if self.key.dora:
                    scale = None if dora_scales is None else dora_scales.get((layer, module))
                    dora_slot = self.dora[module][layer][slot]
                    dora_slot.fill_(1.0) if scale is None else dora_slot.copy_(scale)

    def release(self, placement: Placement) -> None:
        if self._owners[placement.slot] is not placement:
            raise RuntimeError("placement released twice or into the wrong pool")
        self._owners[placement.slot] = None
        heapq.heappush(self._free, placement.slot)

    def compact(self) -> None:
        """Moves used slots to the lowest indices (updating their placements), so the tail can be cut off."""
        target = 0
        for slot, owner in enumerate(list(self._owners)):
            if owner is None:
                continue
            if slot != target:
                for stacks in (self.a, self.b, self.dora):
                    for per_layer in stacks.values():
                        for stack in per_layer:
                            stack[target].copy_(stack[slot])
                self._owners[target], self._owners[slot] = owner, None
                owner.slot = target
            target += 1
        self._free = list(range(target, self.capacity))
        heapq.heapify(self._free)


class DeviceSlots:
    """All pools, within the slot-count and allocated-byte budgets."""

    def __init__(
        self, shape: ModelShape, max_slots: int, max_bytes: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = shape
        self.max_slots = max_slots
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.device = device
        self.pools: dict[PoolKey, SlotPool] = {}
        self.reallocations = 0  # pools grown or cut after their creation (each a copy of their used slots)
        self._element_size = torch.empty((), dtype=dtype).element_size()

    @property
    def used_slots(self) -> int:
        return sum(pool.used for pool in self.pools.values())

    @property
    def allocated_bytes(self) -> int:
        return sum(pool.allocated_bytes for pool in self.pools.values())

    def slot_bytes(self, weights: AdapterWeights) -> int:
        return SlotPool.bytes_per_slot(PoolKey.of(weights), self.shape, self._element_size)

    def fits_at_all(self, weights: AdapterWeights) -> bool:
        """Whether one slot of this adapter's pool fits the byte budget even with every other pool gone."""
        return self.slot_bytes(weights) <= self.max_bytes

    def _room_slots(self, key: PoolKey) -> int:
        """Slots of pool ``key`` the unallocated bytes would hold."""
        return (self.max_bytes - self.allocated_bytes) // SlotPool.bytes_per_slot(key, self.shape, self._element_size)

    def place(
        self, weights: AdapterWeights, dora_scales: DoraScales | None = None, grow: bool = True
    ) -> Placement | None:
        """A slot for ``weights``: a free slot of its pool (one slot write), else a new pool preallocated at what
        the budgets allow, else (``grow``) its full pool grown into free bytes; None when the caller must evict."""
        if self.used_slots >= self.max_slots:
            return None
        key = PoolKey.of(weights)
        pool = self.pools.get(key)
        if pool is not None:
            placement = pool.take(weights, dora_scales)
            if placement is not None or not grow:
                return placement
        current = 0 if pool is None else pool.capacity
        new_capacity = min(self.max_slots, current + self._room_slots(key))
        if new_capacity <= current:
            return None
        if pool is None:
            pool = self.pools[key] = SlotPool(key, self.shape, new_capacity, self.dtype, self.device)
        else:
            pool.grow(new_capacity)
            self.reallocations += 1
        return pool.take(weights, dora_scales)

    def release(self, placement: Placement) -> None:
        placement.pool.release(placement)

    def reclaim(self, weights: AdapterWeights) -> bool:
        """Gives bytes back for ``weights``' pool from the others: empty pools are dropped (no copy), then the pool
        with the most free slots has its free tail cut (compaction, then a copy of its used slots); False when no
        other pool has a free slot."""
        key = PoolKey.of(weights)
        others = [pool for pool in self.pools.values() if pool.key != key and pool.free]
        if not others:
            return False
        empty = [pool for pool in others if pool.used == 0]
        for pool in empty:
            del self.pools[pool.key]
        if not empty:
            max(others, key=lambda pool: pool.free * pool.slot_bytes).cut_free_tail()
            self.reallocations += 1
        return True
