"""The engine listener that turns engine and adapter-cache events into Prometheus metrics."""

from __future__ import annotations

from typing import Literal

from loraplex.server.core.events import EngineListener, Tier
from loraplex.server.observability.metrics import Metrics


class MetricsListener(EngineListener):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def step(self, rows: int, sequences: int, adapters: int, seconds: float) -> None:
        self._metrics.batch_size.observe(sequences)
        self._metrics.batch_adapters.observe(adapters)

    def adapter_lookup(self, tier: Tier, hit: bool) -> None:
        self._metrics.adapter_cache_requests.labels(tier, "hit" if hit else "miss").inc()

    def adapter_loaded(self, tier: Tier, outcome: Literal["ok", "rejected", "error"], seconds: float) -> None:
        self._metrics.adapter_loads.labels(tier, outcome).inc()
        if outcome == "ok":
            self._metrics.adapter_load_seconds.labels(tier).observe(seconds)

    def adapter_evicted(self, tier: Tier) -> None:
        self._metrics.adapter_evictions.labels(tier).inc()

    def preempted(self, tokens: int) -> None:
        self._metrics.preemptions.inc()
        self._metrics.recomputed_tokens.inc(tokens)

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._metrics.prefix_lookups.labels("hit" if cached_tokens else "miss").inc()
        self._metrics.prefix_prompt_tokens.inc(prompt_tokens)
        self._metrics.prefix_hit_tokens.inc(cached_tokens)

    def prefix_evicted(self, blocks: int) -> None:
        self._metrics.prefix_evictions.inc(blocks)
