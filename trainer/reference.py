"""Reference statistics of the validation set for drift monitoring, and the ``loraplex.json`` manifest.

For each held-out example, with the adapter applied: the prompt length and the reference output length in tokens
(the prompt as the server tokenizes it; the output including its end-of-turn token, as the server counts
completion tokens), the mean log-probability of the reference output tokens, and the prompt embedding: the mean
over prompt tokens of the final-norm hidden state in float32, which is what the engine pools during prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loraplex.server.lora.manifest import AdapterManifest, Histogram, ReferenceStats
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.encode import IGNORE, Encoded, Encoder
from loraplex.trainer.formats import Example
from loraplex.trainer.loss import hidden_states
from loraplex.trainer.packing import collate, single_rows

BINS = 10


def histogram(values: Sequence[float], bins: int = BINS) -> Histogram:
    """Quantile-edged bins over ``values`` (equal-width when quantiles coincide), so each bin holds some mass."""
    ordered = sorted(float(v) for v in values)
    low, high = ordered[0], ordered[-1]
    if high - low < 1e-9:  # one value: one bin around it
        return Histogram((low - 0.5, high + 0.5), (len(ordered),))
    quantiles = [ordered[round(i * (len(ordered) - 1) / bins)] for i in range(bins + 1)]
    edges = sorted({low, high, *quantiles})
    if len(edges) < 3:
        step = (high - low) / bins
        edges = [low + i * step for i in range(bins + 1)]
    counts = [0] * (len(edges) - 1)
    for value in ordered:
        index = sum(1 for edge in edges[1:-1] if value >= edge)
        counts[index] += 1
    return Histogram(tuple(edges), tuple(counts))


def reference_stats(
    peft_model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, device: torch.device
) -> ReferenceStats | None:
    """Statistics over ``examples`` with the adapter applied; None without examples."""
    if not examples:
        return None
    encoder = Encoder(tokenizer)
    pairs = [(encoder.prompt_ids(e), encoder.completion_ids(e)) for e in examples]
    pairs = [(p, c) for p, c in pairs if p]
    if not pairs:
        return None
    sequences = [Encoded(tuple(p + c), tuple([IGNORE] * len(p) + c)) for p, c in pairs]
    rows = single_rows(sequences)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    embeddings: list[torch.Tensor] = []
    mean_logprobs: list[float] = []
    was_training = peft_model.training
    peft_model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad, packed=False).to(device)
            hidden = hidden_states(peft_model, batch).float()
            logprobs = torch.log_softmax(peft_model.base_model.model.lm_head(hidden).float(), dim=-1)
            for row, (prompt, completion) in enumerate(pairs[start : start + batch_size]):
                embeddings.append(hidden[row, : len(prompt)].mean(dim=0).cpu())
                span = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
                picked = logprobs[row, list(span), completion]
                mean_logprobs.append(float(picked.mean()))
    peft_model.train(was_training)
    stacked = torch.stack(embeddings)
    centroid = stacked.mean(dim=0)
    distances = torch.linalg.norm(stacked - centroid, dim=1).tolist()
    return ReferenceStats(
        num_examples=len(pairs),
        prompt_tokens=histogram([len(p) for p, _ in pairs]),
        output_tokens=histogram([len(c) for _, c in pairs]),
        mean_logprob=histogram(mean_logprobs),
        embedding_centroid=tuple(float(v) for v in centroid),
        embedding_distance=histogram(distances),
    )


def build_manifest(
    config: TrainConfig,
    fingerprint: str,
    dataset_hash: str,
    eval_metrics: dict[str, Any],
    reference: ReferenceStats | None,
) -> AdapterManifest:
    return AdapterManifest(
        base_fingerprint=fingerprint,
        base_model=config.base_model,
        training=config.as_record(),
        dataset_hash=dataset_hash,
        eval=eval_metrics,
        reference=reference,
    )
