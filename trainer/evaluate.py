"""Evaluation on held-out data, adapter and base side by side: loss, perplexity and generation metrics.

The base is the same model with the adapter disabled (PEFT's ``disable_adapter``), so both columns come from one
load. Generation is greedy from the prompt the server would build for the same request (see
:meth:`Encoder.prompt_ids`) and is scored with :func:`loraplex.trainer.metrics.score`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loraplex.trainer.distributed import Cluster
from loraplex.trainer.encode import Encoded, Encoder, reference_text
from loraplex.trainer.formats import Example, TextExample
from loraplex.trainer.loss import completion_loss
from loraplex.trainer.metrics import score
from loraplex.trainer.packing import collate, single_rows

_SAMPLES = 5
_EXTRA_NEW_TOKENS = 8


@dataclass(frozen=True)
class EvalReport:
    num_examples: int  # examples in the loss
    num_generated: int  # examples generated for the generation metrics
    adapter: dict[str, float]
    base: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        names = [
            name
            for name in ("loss", "perplexity", "exact_match", "token_f1", "rouge_l", "accuracy")
            if name in self.adapter
        ]
        lines = [
            f"Held-out: {self.num_examples} examples for loss, {self.num_generated} generated (greedy).",
            "",
            "| metric | base | adapter | change |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in names:
            base, adapter = self.base.get(name, math.nan), self.adapter[name]
            lines.append(f"| {name} | {base:.4g} | {adapter:.4g} | {adapter - base:+.4g} |")
        for sample in self.samples:
            lines += [
                "",
                f"- prompt: {sample['prompt']!r}",
                f"  - reference: {sample['reference']!r}",
                f"  - base: {sample['base']!r}",
                f"  - adapter: {sample['adapter']!r}",
            ]
        return "\n".join(lines) + "\n"


def _shown_prompt(example: Example) -> str:
    if isinstance(example, TextExample):
        return example.prompt
    return next(turn.content for turn in reversed(example.messages) if turn.role != "assistant")


def loss_sums(
    peft_model: Any,
    encoded: Sequence[Encoded],
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None,
    cluster: Cluster | None = None,
) -> tuple[float, float]:
    """(sum of token losses, number of targets) over ``encoded``, split across processes when ``cluster``."""
    rows = single_rows(encoded)
    if cluster is not None:
        rows = rows[cluster.rank :: cluster.world_size]
    total = count = 0.0
    pad = int(peft_model.base_model.model.config.pad_token_id or 0)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad, packed=False).to(device)
            total += float(completion_loss(peft_model, batch, autocast))
            count += batch.num_targets
    if cluster is not None:
        total, count = cluster.sum(total, device), cluster.sum(count, device)
    return total, count


def _eos_ids(peft_model: Any, tokenizer: Any) -> list[int]:
    ids = {int(tokenizer.eos_token_id)}
    configured = getattr(peft_model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(v) for v in configured)
    return sorted(ids)


def generate(
    peft_model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy completions of token-id prompts (left-padded batches, shortest first), decoded without specials."""
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            prompt = prompts[index]
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=_eos_ids(peft_model, tokenizer),
            )
        for row, index in enumerate(chunk):
            texts[index] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return texts


def evaluate(
    peft_model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    *,
    max_examples: int,
    max_new_tokens: int | None,
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> EvalReport:
    """Loss and perplexity on all of ``encoded``; generation metrics on up to ``max_examples`` prompts."""
    encoder = Encoder(tokenizer)
    generated = [e for e in examples if not (isinstance(e, TextExample) and not e.prompt)][:max_examples]
    prompts = [encoder.prompt_ids(e) for e in generated]
    references = [reference_text(e) for e in generated]
    if max_new_tokens is None:
        longest = max((len(encoder.completion_ids(e)) for e in generated), default=1)
        max_new_tokens = longest + _EXTRA_NEW_TOKENS
    was_training = peft_model.training
    peft_model.eval()
    results: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[str]] = {}
    contexts: dict[str, AbstractContextManager[Any]] = {
        "adapter": nullcontext(),
        "base": peft_model.disable_adapter(),
    }
    for name, context in contexts.items():
        with context:
            total, count = loss_sums(peft_model, encoded, batch_size, device, autocast)
            loss = total / max(count, 1)
            predictions[name] = generate(peft_model, tokenizer, prompts, max_new_tokens, batch_size, device)
        results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))} | score(predictions[name], references)
    peft_model.train(was_training)
    samples = [
        {
            "prompt": _shown_prompt(generated[i]),
            "reference": references[i],
            "base": predictions["base"][i],
            "adapter": predictions["adapter"][i],
        }
        for i in range(min(_SAMPLES, len(generated)))
    ]
    return EvalReport(len(encoded), len(generated), results["adapter"], results["base"], samples)
