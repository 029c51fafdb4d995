"""StepUpload (server/engine/staging.py): a step batch built on the host reaches the device in one copy, whole.

On this CPU the packing is asked for explicitly (``pack=True``; the engine packs only for a non-CPU device): every
index tensor of a mixed step (a prefill chunk over a padded LoRA layout, decode rows over a slot window, base rows;
int64, int32 and bool tensors) comes back with its dtype, shape and values, the pools are the same objects, one
copy was made, the int64 tensors are views of one buffer, and the forward pass gives the same logits. A second
upload, which rewrites the reused host buffer, leaves the first step's tensors intact.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.staging import StepUpload, _collect
from loraplex.server.lora.mapping import LoraMapping
from loraplex.server.lora.ops import select_kernels
from loraplex.server.lora.pool import PoolKey, SlotPool
from loraplex.server.model.attention import SequenceSpan, plan_attention
from loraplex.server.model.forward import DecoderForward, StepBatch
from loraplex.server.model.kv_cache import KVCache
from loraplex.server.model.loader import LoadedBase

CPU = torch.device("cpu")
BLOCK = 4


def _pool(base: LoadedBase, rank: int, seed: int) -> SlotPool:
    pool = SlotPool(PoolKey(rank, ("q_proj", "v_proj"), False), base.shape, 4, torch.float32, CPU)
    generator = torch.Generator().manual_seed(seed)
    for module in pool.key.modules:
        for a, b in zip(pool.a[module], pool.b[module], strict=True):
            a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.2)
    return pool


def _step(base: LoadedBase, kv: KVCache, pools: tuple[SlotPool, SlotPool], shift: int) -> StepBatch:
    """Prefill chunks of 6 rows on slot 0 and 3 on slot 1 of one pool (padded layout), decode rows on slots 2 and 3
    of another (a window), one base decode row."""
    lengths, contexts = [6, 3, 1, 1, 1], [0, 0, 5, 7, 2]
    spans, start = [], 0
    for length, context in zip(lengths, contexts, strict=True):
        blocks = kv.allocator.allocate(kv.blocks_for(context + length)) or []
        spans.append(SequenceSpan(start, length, context, blocks))
        start += length
    rows = sum(lengths)
    slots = [slot for span in spans for slot in kv.slots(list(span.blocks), span.context, span.keys)]
    prefill, decode = pools
    lora = LoraMapping.build([(prefill, 0, 6), (prefill, 1, 3), (decode, 2, 1), (decode, 3, 1)], CPU)
    return StepBatch(
        input_ids=(torch.arange(rows) * 37 + shift) % base.shape.vocab_size,
        positions=torch.tensor([c + i for length, c in zip(lengths, contexts, strict=True) for i in range(length)]),
        cache_index=torch.tensor(slots),
        attention=plan_attention(spans, BLOCK, CPU),
        sample_rows=torch.tensor([5, 8, 9, 10, 11]),
        lora=lora,
        prompt_rows=torch.arange(9),
        prompt_blocks=torch.tensor([slot // BLOCK for slot in slots[:9]]),
        fresh_blocks=torch.tensor([spans[0].blocks[0], spans[0].blocks[1], spans[1].blocks[0]]),
    )


def _tensors(value: object) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _collect(value, found)
    return found


def test_one_copy_moves_every_index_tensor_and_the_step_computes_the_same(base: LoadedBase) -> None:
    shape = base.shape
    kv = KVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, 256, torch.float32, CPU, BLOCK)
    pools = (_pool(base, 8, seed=1), _pool(base, 16, seed=2))
    step = _step(base, kv, pools, shift=0)
    # the layouts this test means to carry: padded groups, a slot window
    assert step.lora.segments[0].padded is not None and step.lora.segments[1].window is not None
    assert step.attention.mask.dtype == torch.bool and step.lora.segments[0].group_ends.dtype == torch.int32
    upload = StepUpload(CPU, pack=True)
    moved = upload(step)
    assert upload.copies == 1
    want, got = _tensors(step), _tensors(moved)
    assert len(got) == len(want) >= 12
    for mine, theirs in zip(got, want, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)
        assert mine.data_ptr() != theirs.data_ptr() or mine.numel() == 0  # copies, not the host tensors
    storages = {t.untyped_storage().data_ptr() for t in got if t.dtype == torch.long and t.numel()}
    assert len(storages) == 1  # the int64 tensors are views of the one packed buffer
    assert all(a.pool is b.pool for a, b in zip(moved.lora.segments, step.lora.segments, strict=True))
    assert moved.lora.segments[0].padded.width == step.lora.segments[0].padded.width  # type: ignore[union-attr]

    forward = DecoderForward(base, kv, select_kernels(CPU, torch.float32))
    expected = forward(step).logits
    torch.testing.assert_close(forward(moved).logits, expected, rtol=0, atol=0)

    later = upload(_step(base, kv, pools, shift=11))  # rewrites the reused host buffer
    assert upload.copies == 2 and not torch.equal(later.input_ids, moved.input_ids)
    for mine, theirs in zip(_tensors(moved), want, strict=True):
        assert torch.equal(mine, theirs)


def test_a_cpu_device_moves_nothing_unless_asked() -> None:
    step = LoraMapping.empty()
    upload = StepUpload(CPU)
    assert upload(step) is step and upload.copies == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_step_moves_in_one_copy_without_a_host_sync(base: LoadedBase) -> None:
    """The host buffer is pinned and the copy non-blocking: under sync-debug mode 'error' neither the first upload
    (after the buffer exists) nor the next one (which reuses the buffer) synchronizes with the device."""
    shape = base.shape
    kv = KVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, 256, torch.float32, CPU, BLOCK)
    pools = (_pool(base, 8, seed=1), _pool(base, 16, seed=2))
    step = _step(base, kv, pools, shift=0)
    upload = StepUpload(torch.device("cuda"))
    upload(step)  # allocates the pinned buffer
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = upload(step)
        again = upload(_step(base, kv, pools, shift=11))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert upload._host.is_pinned() and upload.copies == 3
    for mine, theirs in zip(_tensors(moved), _tensors(step), strict=True):
        assert mine.is_cuda and mine.dtype == theirs.dtype and torch.equal(mine.cpu(), theirs)
    assert not torch.equal(again.input_ids.cpu(), moved.input_ids.cpu())
