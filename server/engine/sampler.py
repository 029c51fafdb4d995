"""Token sampling for a batch of sequences with per-request parameters.

Per row: repetition penalty (HF semantics: positive logits of seen tokens divided by the penalty, negative ones
multiplied), then greedy when ``temperature == 0``, else temperature, top-k, top-p (nucleus, at least one token
kept) and a draw from the row's own ``torch.Generator``; a seeded request therefore draws the same tokens whatever
else shares its batch. The returned log-probability is the chosen token's under the raw model distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.server.engine.types import SamplingParams


@dataclass
class SamplerState:
    """What sampling remembers about one sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    seen: set[int] = field(default_factory=set)  # prompt and output ids, for the repetition penalty

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], device: torch.device) -> SamplerState:
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        return cls(params, generator, seen)

    def observe(self, token: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scores.shape[-1]:
        threshold = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[-1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return scores


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[float]]:
    """``logits [S, vocab]`` float32, one state per row → (token ids, log-probabilities)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = torch.argmax(logits, dim=-1)
    for row, state in enumerate(states):
        params = state.params
        if params.repetition_penalty == 1.0 and params.temperature == 0:
            continue
        scores = logits[row]
        if params.repetition_penalty != 1.0 and state.seen:
            index = torch.tensor(sorted(state.seen), device=logits.device)
            picked = scores.index_select(0, index)
            penalised = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
            scores = scores.index_copy(0, index, penalised)
        if params.temperature == 0:
            chosen[row] = torch.argmax(scores)
            continue
        scores = _filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
        chosen[row] = torch.multinomial(scores.softmax(-1), 1, generator=state.generator)[0]
    tokens = chosen.tolist()
    picked_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    return tokens, picked_logprobs
