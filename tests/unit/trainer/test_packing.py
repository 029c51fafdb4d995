"""Packing: best-fit rows, and packed examples compute exactly what they compute alone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loraplex.trainer.encode import IGNORE, Encoded
from loraplex.trainer.packing import collate, pack_rows, single_rows


def _example(length: int, start: int = 10) -> Encoded:
    ids = tuple(range(start, start + length))
    return Encoded(ids, (IGNORE, *ids[1:]))


def test_best_fit_decreasing_fills_rows() -> None:
    examples = [_example(n) for n in (6, 3, 5, 2, 4)]
    rows = pack_rows(examples, max_length=10)
    assert sorted(len(r.input_ids) for r in rows) == [10, 10]  # 6+4, 5+3+2
    assert sum(r.num_targets for r in rows) == sum(e.num_targets for e in examples)
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[i] == IGNORE for i in starts)  # nothing learns across a boundary


def test_collate_pads_and_masks() -> None:
    rows = single_rows([_example(3), _example(5)])
    batch = collate(rows, pad_id=0, packed=False)
    assert batch.input_ids.shape == (2, 5)
    assert batch.attention_mask is not None and batch.attention_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert batch.labels[0, 3:].tolist() == [IGNORE, IGNORE]
    assert (batch.num_tokens, batch.num_targets) == (8, 6)
    packed = collate(pack_rows([_example(3), _example(5), _example(4)], 9), pad_id=0, packed=True)
    assert packed.attention_mask is None and packed.position_ids is not None
    assert packed.position_ids[1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]  # rows 5+4 and 3 + padding segment


def test_packed_examples_do_not_attend_to_each_other(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    first, second = _example(7, start=100), _example(5, start=300)
    batch = collate(pack_rows([first, second], 16), pad_id=0, packed=True)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        alone_first = model(input_ids=torch.tensor([first.input_ids])).logits[0]
        alone_second = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    torch.testing.assert_close(packed[:7], alone_first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[7:12], alone_second, atol=1e-4, rtol=1e-4)  # across: ~0.7


def test_packed_loss_equals_unpacked_loss(tiny_base: Path) -> None:
    """The trainer's own loss path (LoRA model, logits only at targets) gives the same sum packed or not."""
    from peft import LoraConfig, get_peft_model

    from loraplex.trainer.loss import completion_loss

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    examples = [_example(n, start=50 * n) for n in (9, 4, 6, 3)]
    with torch.no_grad():
        packed = completion_loss(model, collate(pack_rows(examples, 13), 0, packed=True), None)
        unpacked = completion_loss(model, collate(single_rows(examples), 0, packed=False), None)
    torch.testing.assert_close(packed, unpacked, atol=1e-4, rtol=1e-6)
