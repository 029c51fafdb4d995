"""Prefix-cache keys name everything that determines a block: base, adapter id and version content, namespace
(tenant unless shared, and the cache salt), parent block and tokens; each of the peers' cache bugs is a case."""

from __future__ import annotations

from pathlib import Path

from loraplex.server.core.types import GenerationRequest
from loraplex.server.engine.prefix import block_keys, root_key
from loraplex.server.lora.cache import AdapterVersion


def _version(adapter_id: str, content_hash: str, version: int = 1) -> AdapterVersion:
    return AdapterVersion(
        adapter_id=adapter_id,
        version=version,
        content_hash=content_hash,
        rank=8,
        target_modules=("q_proj",),
        use_dora=False,
        size_bytes=1,
        source_dir=Path("/adapters") / adapter_id,
        files=(),
        loaded_at=0.0,
        manifest=None,
        weights=None,
    )


def _root(
    adapter: AdapterVersion | None = None,
    tenant: str | None = "t1",
    salt: str | None = None,
    share: bool = False,
    base: str = "sha256:base",
) -> bytes:
    request = GenerationRequest(request_id="r", prompt="x", tenant=tenant, cache_salt=salt)
    return root_key(base, adapter, request, share)


def test_everything_that_determines_the_blocks_is_in_the_root() -> None:
    a_v1 = _version("a", "sha256:1")
    roots = {
        "base model": _root(),
        "adapter a": _root(a_v1),
        "a replaced under the same id and version number": _root(_version("a", "sha256:2")),
        "same weights under another id": _root(_version("b", "sha256:1")),
        "other tenant": _root(a_v1, tenant="t2"),
        "salted": _root(a_v1, salt="s1"),
        "other salt": _root(a_v1, salt="s2"),
        "other base": _root(a_v1, base="sha256:other"),
    }
    assert len(set(roots.values())) == len(roots)
    assert _root(a_v1) == _root(_version("a", "sha256:1", version=3))  # same content: the same blocks


def test_fields_cannot_run_into_each_other() -> None:
    assert _root(_version("ab", "c")) != _root(_version("a", "bc"))
    assert _root(tenant="t", salt="x") != _root(tenant="tx", salt=None)


def test_sharing_across_tenants_merges_tenants_but_keeps_salts_apart() -> None:
    assert _root(tenant="t1", share=True) == _root(tenant="t2", share=True)
    assert _root(tenant="t1", salt="s", share=True) == _root(tenant="t2", salt="s", share=True)
    assert _root(tenant="t1", salt="s", share=True) != _root(tenant="t1", share=True)


def test_block_keys_chain_full_blocks_only() -> None:
    root = _root()
    tokens = list(range(100, 140))
    keys = block_keys(root, tokens, 16)
    assert len(keys) == 2  # 40 tokens: two full blocks; the partial third is never keyed
    assert block_keys(root, tokens[:35], 16) == keys  # a prompt's keys are a prefix of a longer one's
    assert block_keys(_root(tenant="t2"), tokens, 16)[0] != keys[0]
    changed = [*tokens[:3], 7, *tokens[4:]]  # one token of the first block differs: every later key differs
    assert all(a != b for a, b in zip(block_keys(root, changed, 16), keys, strict=True))
    later = [*tokens[:20], 7, *tokens[21:]]  # only the second block differs
    other = block_keys(root, later, 16)
    assert other[0] == keys[0] and other[1] != keys[1]
    assert block_keys(root, tokens[:15], 16) == []
