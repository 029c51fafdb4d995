"""The completion-only loss, with logits computed only where a label is.

Instead of the full ``[B, T, vocab]`` logits of ``model(labels=...)``, the decoder's hidden states are gathered at
the positions that predict a trained token and only those go through ``lm_head`` and the cross-entropy. With
prompt masking most positions carry no loss, so this skips most of the largest matmul and the softmax over the
vocabulary; the result is the same sum of token losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loraplex.trainer.encode import IGNORE
from loraplex.trainer.packing import Batch


def hidden_states(peft_model: Any, batch: Batch) -> torch.Tensor:
    """The final-norm hidden states ``[B, T, H]`` of the adapted decoder."""
    causal_lm = peft_model.base_model.model
    output = causal_lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    hidden: torch.Tensor = output.last_hidden_state
    return hidden


def target_logits(peft_model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``[N, vocab]`` float32, targets ``[N]``) at the N positions that predict a trained token."""
    hidden = hidden_states(peft_model, batch)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    logits = peft_model.base_model.model.lm_head(hidden[:, :-1][keep])
    return logits.float(), targets[keep]


def completion_loss(peft_model: Any, batch: Batch, autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of the token cross-entropies over the batch's trained positions (a float32 scalar)."""
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits, targets = target_logits(peft_model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")
