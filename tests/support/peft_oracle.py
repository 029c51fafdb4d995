"""PEFT as the oracle: a base with adapters loaded, greedy generation and logits with one adapter active (or none,
for base rows)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loraplex.server.core.types import ChatMessage, GenerationRequest, SamplingParams


def peft_with_adapters(model: Any, root: Path, names: Sequence[str]) -> Any:
    """``model`` wrapped by PEFT with the adapters ``root / name`` loaded under their names, in eval mode."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    return peft.eval()


@contextmanager
def active(peft: Any, adapter: str | None) -> Iterator[None]:
    """Runs the body with ``adapter`` active, or with every adapter disabled when it is None."""
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                yield
        else:
            peft.set_adapter(adapter)
            yield


def peft_generate(
    peft: Any, adapter: str | None, prompt_ids: Sequence[int], max_new_tokens: int, ignore_eos: bool = False
) -> tuple[list[int], list[float]]:
    """PEFT's greedy tokens and each token's log-probability under the raw logits."""
    input_ids = torch.tensor([list(prompt_ids)], device=peft.device)
    extra = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
    with active(peft, adapter):
        out = peft.generate(
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def peft_logits(peft: Any, adapter: str | None, input_ids: Sequence[int]) -> torch.Tensor:
    """Float32 logits at every position of ``input_ids``: ``[len(input_ids), vocab]``."""
    with active(peft, adapter):
        return peft(input_ids=torch.tensor([list(input_ids)], device=peft.device)).logits[0].float()


def oracle_requests(
    adapters: Sequence[str | None], prompts: Sequence[str], max_new_tokens: int
) -> list[GenerationRequest]:
    """One greedy chat request with logprobs per (adapter, prompt) pair: the rows of a mixed batch to check."""
    return [
        GenerationRequest(
            request_id=f"r{i}",
            messages=(ChatMessage("user", prompt),),
            adapter_id=adapter,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, logprobs=True),
        )
        for i, (adapter, prompt) in enumerate(zip(adapters, prompts, strict=True))
    ]
