"""Telemetry: the one object the rest of the server talks to for metrics and drift.

It owns the registry, the instruments, the scrape-time collector, the adapter-label bound, the drift monitor and
the engine listener. The API records each generation's outcome here with plain values (labels, timestamps, the
engine's ``Finished`` event); :meth:`serve` exposes the registry on ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from loraplex.server.config import ObservabilitySettings
from loraplex.server.core.types import AdapterInfo, EngineStats, Finished
from loraplex.server.observability.drift import DriftMonitor, Sample
from loraplex.server.observability.labels import OTHER, LabelBounder
from loraplex.server.observability.listener import MetricsListener
from loraplex.server.observability.metrics import Metrics, RouteGauges, StateCollector

ManifestOf = Callable[[str], Mapping[str, Any] | None]  # adapter id -> parsed loraplex.json of its current version


@dataclass(frozen=True)
class RequestLabels:
    adapter: str  # adapter id, or "base" (bounded when recorded)
    route: str = ""
    variant: str = ""


@dataclass(frozen=True)
class RequestTiming:
    """``time.monotonic()`` instants of one request on the server."""

    started: float  # the RPC (or mirrored request) began
    first_token: float | None
    finished: float


class Telemetry:
    def __init__(self, settings: ObservabilitySettings, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.state = StateCollector(settings.max_adapter_labels)
        self.registry.register(self.state)
        self.adapters = LabelBounder(settings.max_adapter_labels)
        self.drift = DriftMonitor(settings.drift_window, settings.drift_min_samples, settings.drift_reference_size)
        self.state.drift = self.drift.scores
        self.listener = MetricsListener(self.metrics)
        self._manifest_of: ManifestOf = lambda adapter_id: None

    # ------------------------------------------------------------------------------------------------- wiring

    def attach_engine(
        self,
        stats: Callable[[], EngineStats],
        queue_capacity: int,
        manifest_of: ManifestOf,
        build: Mapping[str, str],
        adapters: Callable[[], Iterable[AdapterInfo]] | None = None,
    ) -> None:
        """Reads engine state (and, with ``adapters``, each adapter's residency) at scrape time from now on;
        ``build`` holds version, base_model and quantization."""
        self.state.queue_capacity = queue_capacity
        self.state.engine_stats = stats
        self.state.adapters = adapters
        self._manifest_of = manifest_of
        self.metrics.build_info.labels(build["version"], build["base_model"], build["quantization"]).set(1)

    def attach_routes(self, routes: Callable[[], Iterable[RouteGauges]]) -> None:
        self.state.routes = routes

    def serve(self, host: str, port: int) -> WSGIServer:
        """Starts the ``/metrics`` HTTP server on a daemon thread; ``server_address`` has the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    # ------------------------------------------------------------------------------------------------ records

    def request_succeeded(self, labels: RequestLabels, timing: RequestTiming, finished: Finished) -> None:
        adapter = self.adapters.admit(labels.adapter)
        values = (adapter, labels.route, labels.variant)
        m = self.metrics
        m.requests.labels(*values, "ok").inc()
        m.request_duration.labels(*values).observe(timing.finished - timing.started)
        m.queue_wait.labels(*values).observe(finished.timings.queue_wait)
        m.prompt_tokens.labels(*values).inc(finished.usage.prompt_tokens)
        m.generated_tokens.labels(*values).inc(finished.usage.completion_tokens)
        if timing.first_token is not None:
            m.time_to_first_token.labels(*values).observe(timing.first_token - timing.started)
            if finished.usage.completion_tokens > 1:
                per_token = (timing.finished - timing.first_token) / (finished.usage.completion_tokens - 1)
                m.time_per_output_token.labels(*values).observe(per_token)
        if adapter != OTHER:
            adapter_id = finished.adapter_id
            sample = Sample(
                finished.usage.prompt_tokens,
                finished.usage.completion_tokens,
                finished.mean_logprob,
                finished.prompt_embedding,
            )
            manifest = (lambda: self._manifest_of(adapter_id)) if adapter_id else (lambda: None)
            self.drift.observe(adapter, finished.adapter_version, manifest, sample)

    def request_failed(self, labels: RequestLabels, status: str) -> None:
        """A generation that ended with ``status`` (a gRPC code in lower case, or "shed" for a mirrored one).

        An adapter a caller named directly is labelled ``other`` until it served a request successfully (unknown
        ids take no label room); one behind a route was chosen by an admin and is admitted. An empty adapter label
        means the request failed before its target was known.
        """
        if not labels.adapter:
            adapter = ""
        elif labels.route:
            adapter = self.adapters.admit(labels.adapter)
        else:
            adapter = self.adapters.known(labels.adapter)
        self.metrics.requests.labels(adapter, labels.route, labels.variant, status).inc()

    def route_assigned(self, route: str, variant: str) -> None:
        self.metrics.route_assignments.labels(route, variant).inc()

    def feedback(self, route: str, variant: str, outcome: str) -> None:
        self.metrics.feedback.labels(route, variant, outcome).inc()
