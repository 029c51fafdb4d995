"""Token sampling for a batch of sequences with per-request parameters, vectorised over the rows.

Semantics, per row, in this order (those of transformers' logits processors, applied through a
``LogitsProcessorList`` of ``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``
and ``TopPLogitsWarper``):

1. Repetition penalty (``repetition_penalty != 1``): for every token seen in the prompt or the output so far, a
   negative score is multiplied by the penalty, any other is divided by it (a penalty below 1 favours repeats).
2. ``temperature == 0``: greedy, the argmax of the penalised scores (no temperature, top-k or top-p).
3. Otherwise the scores are divided by the temperature, then top-k (``top_k == 0`` or ``>= vocab`` is off) keeps
   every token whose score is at least the k-th largest (ties kept), then top-p (``top_p == 1`` is off) sorts the
   scores ascending and drops the tokens whose cumulative probability is ``<= 1 - top_p``, never the most likely
   one (``min_tokens_to_keep = 1``). The token is drawn from the softmax of what is left.

All rows are handled at once with batched tensor ops: per-row parameters travel as ``[rows]`` tensors in one
host→device copy, and a feature a row does not use is a no-op for it. Only rows with a penalty pay for it: each
such :class:`SamplerState` keeps a boolean mask of the seen tokens over the vocabulary on the device, set by
:meth:`SamplerState.observe` one token at a time. Every sampled row draws one uniform from its own CPU
``torch.Generator`` and takes the token by inverse CDF over its filtered distribution, so a seeded request draws
the same tokens whatever else shares its batch and in whatever row order. When every row is plain greedy without a
penalty (the common case) a call costs an argmax, a log-softmax gather and the transfer.

Structured output: a row with a constraint (a :class:`TokenMatcher`) first has every token its grammar does not
allow next set to ``-inf`` (EOS only where the grammar accepts), from one ``[rows, vocab]`` mask per call filled
only for the constrained rows (:func:`allowed_tokens`); :meth:`SamplerState.observe` advances the matcher. A call
without constrained rows builds no mask.

The returned log-probability is the chosen token's log-softmax under the raw model logits (before constraint,
penalty and temperature). Tokens and log-probabilities come back to the host in one device→host transfer per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.server.core.types import SamplingParams
from loraplex.server.engine.constraints import TokenMatcher, allowed_tokens

_CPU = torch.device("cpu")
_NEG_INF = float("-inf")
_EXACT_FLOAT32_INTS = 2**24  # row indices and token ids travel as float32 below this, exactly


@dataclass(eq=False)
class SamplerState:
    """What sampling remembers about one sequence: its parameters, generator, (with a penalty) seen tokens and
    (with a constraint) grammar matcher."""

    params: SamplingParams
    generator: torch.Generator | None  # on the CPU; None for greedy rows
    device: torch.device
    greedy: bool
    penalised: bool
    _pending: list[int] = field(default_factory=list)  # seen ids not yet in the mask (it is sized on first use)
    _seen: torch.Tensor | None = None  # bool [vocab] on ``device``, only for rows with a penalty
    matcher: TokenMatcher | None = None  # only for rows with a constraint

    @classmethod
    def create(
        cls, params: SamplingParams, prompt_ids: list[int], device: torch.device, matcher: TokenMatcher | None = None
    ) -> SamplerState:
        greedy = params.temperature == 0
        penalised = params.repetition_penalty != 1.0
        generator: torch.Generator | None = None
        if not greedy:
            generator = torch.Generator(device=_CPU)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        return cls(params, generator, device, greedy, penalised, list(prompt_ids) if penalised else [], matcher=matcher)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a penalty or constraint: the argmax of the raw logits."""
        return self.greedy and not self.penalised and self.matcher is None

    def observe(self, token: int) -> bool:
        """Records a generated token (for the repetition penalty and the constraint); False when the constraint
        refused it."""
        if self.matcher is not None and not self.matcher.advance(token):
            return False
        if not self.penalised:
            return True
        if self._seen is None:
            self._pending.append(token)
        else:
            self._seen[token].fill_(True)
        return True

    def seen_mask(self, vocab: int) -> torch.Tensor:
        """The bool ``[vocab]`` mask of the tokens seen in the prompt and output (rows with a penalty only)."""
        seen = self._seen
        if seen is None:
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            ids = [token for token in self._pending if 0 <= token < vocab]
            if ids:
                seen.index_fill_(0, torch.tensor(ids, dtype=torch.long).to(self.device), True)
            self._pending = []
            self._seen = seen
        elif seen.shape[0] != vocab:
            raise ValueError(f"vocabulary changed from {seen.shape[0]} to {vocab} tokens")
        return seen


@dataclass
class _Prepared:
    """A batch after the repetition penalty, with the sampled rows' filtered scores."""

    scores: torch.Tensor  # [S, vocab], penalised
    sampled: torch.Tensor | None  # [R] long: the sampled rows (None when R == 0)
    all_sampled: bool  # R == S
    filtered: torch.Tensor | None  # [R, vocab]: tempered, top-k and top-p filtered scores of the sampled rows
    uniforms: torch.Tensor | None  # [R] float32 on the device, one per sampled row from its own generator


def _prepare(logits: torch.Tensor, states: list[SamplerState], draw: bool) -> _Prepared:
    rows, vocab = logits.shape
    device = logits.device
    penalised = [row for row, state in enumerate(states) if state.penalised]
    sampled = [row for row, state in enumerate(states) if not state.greedy]
    sampled_states = [states[row] for row in sampled]
    top_p_rows = [local for local, state in enumerate(sampled_states) if state.params.top_p < 1.0]
    ks = [state.params.top_k if 0 < state.params.top_k < vocab else 0 for state in sampled_states]
    k_max = max(ks, default=0)

    # Every per-row parameter in one float32 host→device copy (indices are exact below 2**24).
    packed: list[float] = []
    packed += penalised
    packed += [states[row].params.repetition_penalty for row in penalised]
    packed += sampled
    packed += [state.params.temperature for state in sampled_states]
    packed += [k - 1 for k in ks]  # -1: no top-k for that row
    packed += top_p_rows
    # ``1 - top_p`` in double, then float32: the very threshold TopPLogitsWarper compares against.
    packed += [1.0 - sampled_states[local].params.top_p for local in top_p_rows]
    if draw:
        for state in sampled_states:
            assert state.generator is not None
            packed.append(float(torch.rand((), generator=state.generator, dtype=torch.float32)))
    values = torch.tensor(packed, dtype=torch.float32).to(device, non_blocking=True)
    sizes = [len(penalised)] * 2 + [len(sampled)] * 3 + [len(top_p_rows)] * 2 + [len(sampled)] * draw
    parts = iter(torch.split(values, sizes))

    scores = logits
    pen_rows, penalties = next(parts).long(), next(parts).unsqueeze(1)
    if penalised:
        masks = torch.stack([states[row].seen_mask(vocab) for row in penalised])
        picked = logits if len(penalised) == rows else logits.index_select(0, pen_rows)
        punished = torch.where(picked < 0, picked * penalties, picked / penalties)
        picked = torch.where(masks, punished, picked)
        scores = picked if len(penalised) == rows else logits.index_copy(0, pen_rows, picked)

    sampled_rows, temperatures, k_index = next(parts).long(), next(parts).unsqueeze(1), next(parts).long()
    p_rows, p_thresholds = next(parts).long(), next(parts).unsqueeze(1)
    if not sampled:
        return _Prepared(scores, None, False, None, None)
    all_sampled = len(sampled) == rows
    filtered = (scores if all_sampled else scores.index_select(0, sampled_rows)) / temperatures
    filtered = torch.nan_to_num(filtered, nan=_NEG_INF, posinf=torch.finfo(filtered.dtype).max, neginf=_NEG_INF)
    if k_max:
        kth = torch.topk(filtered, k_max, dim=-1).values.gather(1, k_index.clamp(min=0).unsqueeze(1))
        kth = kth.masked_fill(k_index.unsqueeze(1) < 0, _NEG_INF)
        filtered = filtered.masked_fill(filtered < kth, _NEG_INF)
    if top_p_rows:
        every = len(top_p_rows) == len(sampled)
        part = filtered if every else filtered.index_select(0, p_rows)
        ordered, order = torch.sort(part, dim=-1, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= p_thresholds
        drop[:, -1] = False
        part = part.masked_fill(drop.scatter(1, order, drop), _NEG_INF)
        filtered = part if every else filtered.index_copy(0, p_rows, part)
    uniforms = next(parts) if draw else None
    return _Prepared(scores, sampled_rows, all_sampled, filtered, uniforms)


def _draw(filtered: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row the first token whose cumulative probability exceeds the row's uniform."""
    cdf = filtered.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=filtered.shape[-1] - 1)


def _answer(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[list[int], list[float]]:
    picked = torch.log_softmax(logits, dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
    dtype = torch.float32 if logits.shape[-1] <= _EXACT_FLOAT32_INTS else torch.float64
    both = torch.stack((chosen.to(dtype), picked.to(dtype))).cpu()  # the one device→host transfer
    return both[0].long().tolist(), both[1].tolist()


def _check(logits: torch.Tensor, states: list[SamplerState]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} sampler states")


def _constrain(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """``logits`` with the tokens the constrained rows' grammars disallow at ``-inf`` (itself without any)."""
    matchers = [state.matcher for state in states]
    if all(matcher is None for matcher in matchers):
        return logits
    return logits.masked_fill(~allowed_tokens(matchers, logits.shape[-1], logits.device), _NEG_INF)


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[float]]:
    """``logits [S, vocab]`` float32, one state per row → (token ids, raw log-probabilities of those tokens)."""
    _check(logits, states)
    if not states:
        return [], []
    if all(state.plain_greedy for state in states):
        return _answer(logits, logits.argmax(dim=-1))
    prepared = _prepare(_constrain(logits, states), states, draw=True)
    if prepared.filtered is None or prepared.uniforms is None or prepared.sampled is None:
        return _answer(logits, prepared.scores.argmax(dim=-1))
    drawn = _draw(prepared.filtered, prepared.uniforms)
    chosen = drawn if prepared.all_sampled else prepared.scores.argmax(dim=-1).index_copy(0, prepared.sampled, drawn)
    return _answer(logits, chosen)


def filtered_logprobs(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """The ``[S, vocab]`` log-probabilities each row's token is drawn from (``-inf`` for filtered-out tokens).

    Sampled rows: the log-softmax of the penalised, tempered, top-k and top-p filtered scores. Greedy rows: all the
    mass (0) on the argmax of the penalised scores. Draws nothing from the generators.
    """
    _check(logits, states)
    prepared = _prepare(_constrain(logits, states), states, draw=False)
    out = torch.full_like(logits, _NEG_INF)
    out.scatter_(1, prepared.scores.argmax(dim=-1, keepdim=True), 0.0)
    if prepared.filtered is not None and prepared.sampled is not None:
        out.index_copy_(0, prepared.sampled, torch.log_softmax(prepared.filtered, dim=-1))
    return out
