"""The paged KV cache: per-layer K/V buffers cut into fixed-size blocks, and the allocator that shares them out.

Layout per layer: ``k[layer]`` and ``v[layer]`` are flat ``[num_blocks * block_size, kv_heads, head_dim]``
(token-major). Block ``b`` holds slots ``b * block_size .. (b + 1) * block_size - 1``; a sequence owns a *block
table* (a list of block ids, :attr:`Sequence.blocks <loraplex.server.engine.sequence.Sequence.blocks>`), so its
token at position ``p`` lives in slot ``blocks[p // block_size] * block_size + p % block_size``. Writes of a step's
new tokens stay one ``index_copy_`` per layer; attention (:mod:`loraplex.server.model.attention`) gathers the
step's slots with one ``index_select`` per layer, each slot a whole ``kv_heads * head_dim`` row.

A sequence takes blocks as its tokens are computed (the scheduler grows its table before each step), never for
``max_new_tokens`` up front, and gives them all back when it finishes or is preempted: there is no fragmentation,
no compaction and no copy. The capacity is ``engine.kv_cache_tokens`` rounded up to whole blocks of
``engine.kv_block_size``.

The prefix cache lives in the same pool (:class:`BlockPool`). A block is *free* (on the free list), *referenced*
(in the block tables of one or more sequences) or *idle cached*: unreferenced but holding the K/V of a full block
published under a key (:mod:`loraplex.server.engine.prefix` says what a key covers), kept in an LRU so that a later
sequence with that key points its table at it instead of recomputing it. Allocation takes free blocks first, then
evicts idle cached ones, least recently released first; a referenced block is never evicted or freed, so a
sequence's release or preemption never takes a block another one still reads. A key names at most one block: a
sequence that computed the same block meanwhile keeps its copy private. Only full blocks are published, and their
owner writes its later tokens to blocks past them, so a shared block is never written (no copy-on-write).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` positions."""
    return -(-tokens // block_size)


class BlockAllocator:
    """O(1) free list of block ids ``0 .. num_blocks - 1``; refuses double frees and foreign ids."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._in_use = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        if count <= 0:
            return []
        taken = self._free[-count:]
        del self._free[-count:]
        for block in taken:
            self._in_use[block] = 1
        return taken

    def free(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if not 0 <= block < self.num_blocks or not self._in_use[block]:
                raise ValueError(f"block {block} is not allocated")
            self._in_use[block] = 0
            self._free.append(block)


class BlockPool:
    """Reference counts, published keys and the LRU of idle cached blocks over a :class:`BlockAllocator`.
    ``num_free`` counts free and idle cached blocks together: :meth:`allocate` can hand out both."""

    def __init__(self, num_blocks: int) -> None:
        self._free = BlockAllocator(num_blocks)
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # idle cached blocks, least recently released first
        self.evictions = 0  # idle cached blocks taken for new contents, since start

    @property
    def num_free(self) -> int:
        """Blocks :meth:`allocate` can hand out: free ones and idle cached ones."""
        return self._free.num_free + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks published under a key (referenced or idle)."""
        return len(self._key_of)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks referenced once each, or None (and nothing taken) when fewer are free or idle."""
        if count > self.num_free:
            return None
        if count <= 0:
            return []
        fresh = min(count, self._free.num_free)
        taken = self._free.allocate(fresh) or []
        for _ in range(count - fresh):
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
            taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def free(self, blocks: Iterable[int]) -> None:
        """Drops one reference of each block; an unreferenced one goes idle (published) or back to the free list.
        Release a table tail first (``reversed``) so that its deepest blocks are evicted first."""
        for block in blocks:
            if not 0 <= block < self.num_blocks or not self._refs[block]:
                raise ValueError(f"block {block} is not allocated")
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._free.free((block,))

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest run of ``keys`` (from the first) that are published; takes no reference."""
        found: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def share(self, blocks: Iterable[int]) -> None:
        """Takes one more reference of each published block (from :meth:`lookup`); idle ones leave the LRU."""
        for block in blocks:
            if block not in self._key_of:
                raise ValueError(f"block {block} is not published")
            if not self._refs[block]:
                del self._idle[block]
            self._refs[block] += 1

    def publish(self, block: int, key: bytes) -> bool:
        """Publishes a referenced full block under ``key``; False (it stays private) when the key names another
        block already."""
        if not self._refs[block]:
            raise ValueError(f"block {block} is not allocated")
        if key in self._block_of or block in self._key_of:
            return False
        self._key_of[block] = key
        self._block_of[key] = block
        return True


class KVCache:
    """K and V buffers of every layer plus the block allocator that shares them out."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = 16,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.allocator = BlockPool(blocks_for(capacity, block_size))
        shape = (self.allocator.num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        """Token positions in the cache (whole blocks)."""
        return self.allocator.num_blocks * self.block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def usage(self) -> float:
        """Blocks referenced by sequences / all blocks (idle cached blocks count as free)."""
        return self.allocator.num_used / self.allocator.num_blocks

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def slots(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Cache slots of positions ``start .. stop - 1`` of a sequence with block table ``blocks``."""
        size = self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, stop)]

    def write(self, layer: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores new tokens: ``index [T]`` cache slots, ``keys/values [T, kv_heads, head_dim]``."""
        self.k[layer].index_copy_(0, index, keys)
        self.v[layer].index_copy_(0, index, values)
