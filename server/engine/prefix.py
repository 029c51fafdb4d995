"""Prefix-cache keys: what names a full KV block, so that a block is reused only where its K/V would be the same.

A block's K/V depend on the base model, the adapter's weights and every token up to the block's end. So the key of
a sequence's block ``i`` is ``sha256(key of block i - 1, its tokens)``, and block 0's parent is a *root* key over

* the base's fingerprint,
* the adapter id and its version's ``content_hash`` (a hash of the weights file, so a replaced adapter, even under
  the same id and with the same version number, never meets its old blocks; the base model has none),
* the cache namespace: the request's tenant unless ``engine.prefix_cache_share_tenants`` is on (a shared cache leaks
  other tenants' prompts through time to first token), plus the request's ``cache_salt`` when it sets one.

The fields are length-prefixed, so no two different field tuples hash alike. Only prompt blocks are keyed: output
blocks are not published, so the prompt embedding (pooled over prompt rows, per block) stays whole on a hit.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from loraplex.server.core.types import GenerationRequest
from loraplex.server.lora.cache import AdapterVersion


def _field(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<I", len(data)) + data


def root_key(
    base_fingerprint: str, adapter: AdapterVersion | None, request: GenerationRequest, share_tenants: bool
) -> bytes:
    """The parent of a sequence's first block: base, adapter version and cache namespace."""
    digest = hashlib.sha256(b"loraplex-prefix-v1")
    digest.update(_field(base_fingerprint))
    digest.update(_field(adapter.adapter_id if adapter is not None else ""))
    digest.update(_field(adapter.content_hash if adapter is not None else ""))
    digest.update(_field("" if share_tenants else request.tenant or ""))
    digest.update(_field(request.cache_salt or ""))
    return digest.digest()


def block_keys(root: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of the full blocks of ``token_ids``, each chained to the one before (the first to ``root``)."""
    keys: list[bytes] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}q", *block)).digest()
        keys.append(parent)
    return keys
