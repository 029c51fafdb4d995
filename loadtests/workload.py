"""What a load test sends: adapter popularity (Zipf over N adapters), prompt and output lengths drawn from
configurable distributions, and prompts built from plain words.

A distribution is written ``KIND:ARGS`` so it fits in a flag or an environment variable:

    const:32            always 32
    uniform:8:64        an integer in [8, 64], every value equally likely
    normal:48:12        rounded normal(mean 48, sd 12), at least 1
    lognormal:32:0.5    rounded lognormal with median 32 and sigma 0.5, at least 1
    choice:16,32,128    one of the listed values, equally likely

Popularity: adapter ``i`` (0-based) of ``n`` is chosen with probability ∝ ``1 / (i + 1) ** s``; ``s = 0`` is uniform.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

_WORD_LIST = (
    "apple river stone cloud green market window paper silver garden orange letter winter summer yellow "
    "bridge forest ticket planet engine morning castle doctor island purple coffee mirror rocket shadow "
    "spring basket candle dragon finger hammer jungle kitchen ladder meadow needle pencil pillow rabbit "
    "saddle tunnel violin wallet anchor butter circle desert feather guitar harbor insect jacket kettle"
)
WORDS = tuple(_WORD_LIST.split())


class DistributionError(ValueError):
    """A distribution spec that cannot be parsed; the message shows the accepted forms."""


@dataclass(frozen=True)
class Distribution:
    """A distribution of positive integers, parsed from ``KIND:ARGS`` (see the module docstring)."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> Distribution:
        kind, _, rest = spec.strip().partition(":")
        forms = "const:N, uniform:LO:HI, normal:MEAN:SD, lognormal:MEDIAN:SIGMA, choice:A,B,C"
        try:
            params = tuple(float(p) for p in rest.replace(",", ":").split(":") if p)
        except ValueError:
            raise DistributionError(f"'{spec}': the parameters must be numbers ({forms})") from None
        arity = {"const": 1, "uniform": 2, "normal": 2, "lognormal": 2}
        if kind == "choice":
            if not params:
                raise DistributionError(f"'{spec}': choice needs at least one value ({forms})")
        elif kind not in arity:
            raise DistributionError(f"'{spec}': unknown kind '{kind}' ({forms})")
        elif len(params) != arity[kind]:
            raise DistributionError(f"'{spec}': {kind} takes {arity[kind]} parameter(s) ({forms})")
        if kind == "uniform" and params[0] > params[1]:
            raise DistributionError(f"'{spec}': uniform needs LO <= HI")
        if any(p < 0 for p in params) or (kind in ("const", "uniform", "choice") and min(params) < 1):
            raise DistributionError(f"'{spec}': values must be positive")
        return cls(kind, params)

    def sample(self, rng: random.Random) -> int:
        p = self.params
        if self.kind == "const":
            value = p[0]
        elif self.kind == "uniform":
            value = rng.randint(int(p[0]), int(p[1]))
        elif self.kind == "normal":
            value = rng.gauss(p[0], p[1])
        elif self.kind == "lognormal":
            value = math.exp(rng.gauss(math.log(p[0]), p[1]))
        else:
            value = rng.choice(p)
        return max(1, round(value))


class Popularity:
    """Picks one of ``n`` items with Zipf weights ``1 / (i + 1) ** s`` (``s = 0``: uniform)."""

    def __init__(self, n: int, s: float) -> None:
        if n < 1:
            raise ValueError("popularity needs at least one item")
        if s < 0:
            raise ValueError("the Zipf exponent must be >= 0")
        weights = [1.0 / (i + 1) ** s for i in range(n)]
        total = sum(weights)
        self.probabilities = tuple(w / total for w in weights)
        self._cumulative = list(itertools.accumulate(self.probabilities))

    def pick(self, rng: random.Random) -> int:
        index = bisect.bisect_left(self._cumulative, rng.random())
        return min(index, len(self._cumulative) - 1)


def adapter_ids(prefix: str, count: int) -> list[str]:
    """The ids ``python -m loadtests.synthetic_adapters --prefix PREFIX`` writes: PREFIX0000, PREFIX0001, ..."""
    return [f"{prefix}{index:04d}" for index in range(count)]


def prompt_text(words: int, rng: random.Random, vocabulary: Sequence[str] = WORDS) -> str:
    """A prompt of ``words`` space-separated plain words."""
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@dataclass(frozen=True)
class Draw:
    """One request's choices."""

    adapter: str
    prompt: str
    max_new_tokens: int


class RequestMix:
    """Adapters by popularity, prompts and output lengths by their distributions, from one seeded generator."""

    def __init__(
        self, adapters: Sequence[str], zipf_s: float, prompt_words: Distribution, output_tokens: Distribution
    ) -> None:
        self.adapters = tuple(adapters)
        self.popularity = Popularity(len(self.adapters), zipf_s)
        self.prompt_words = prompt_words
        self.output_tokens = output_tokens

    def draw(self, rng: random.Random) -> Draw:
        adapter = self.adapters[self.popularity.pick(rng)]
        return Draw(adapter, prompt_text(self.prompt_words.sample(rng), rng), self.output_tokens.sample(rng))
