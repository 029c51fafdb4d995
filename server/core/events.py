"""Engine events for observability: what happened in each step and in the adapter cache.

The engine and the adapter cache call an :class:`EngineListener`; the default does nothing, the observability
room subclasses it to update Prometheus metrics. Calls come from the engine thread and the adapter loader threads
and must return quickly.
"""

from __future__ import annotations

from typing import Literal

Tier = Literal["host", "device"]


class EngineListener:
    """No-op base: override what you observe."""

    def step(self, rows: int, sequences: int, adapters: int, seconds: float) -> None:
        """One forward pass: ``rows`` tokens of ``sequences`` sequences using ``adapters`` distinct adapters."""

    def adapter_lookup(self, tier: Tier, hit: bool) -> None:
        """A request needed an adapter in ``tier`` (host: in memory at all; device: in a slot)."""

    def adapter_loaded(self, tier: Tier, outcome: Literal["ok", "rejected", "error"], seconds: float) -> None:
        """An adapter arrived in ``tier`` (host: read from disk and validated; device: copied into a slot)."""

    def adapter_evicted(self, tier: Tier) -> None:
        """An idle adapter left ``tier`` to make room."""

    def preempted(self, tokens: int) -> None:
        """A running sequence gave its KV blocks back (out of cache); ``tokens`` will be recomputed on resume."""

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """An admitted sequence looked up its prompt in the prefix cache: ``cached_tokens`` of its
        ``prompt_tokens`` were found (their prefill is skipped)."""

    def prefix_evicted(self, blocks: int) -> None:
        """Idle cached KV blocks were evicted to make room for live sequences."""
