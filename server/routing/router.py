"""The routing room's one entry point for the API: resolve a route to a variant (and maybe a shadow), record what
happened, manage routes, take feedback and build reports."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.server.config import RoutingSettings
from loraplex.server.routing.abstats import SampleRatio
from loraplex.server.routing.bucketing import bucket_of
from loraplex.server.routing.errors import UnknownRoute
from loraplex.server.routing.experiments import Experiments, Served
from loraplex.server.routing.report import RouteReport, build_report, sample_ratio
from loraplex.server.routing.routes import BUCKETS, Route, Shadow, Variant
from loraplex.server.routing.store import CompiledRoute, RouteStore


@dataclass(frozen=True)
class Assignment:
    """Where one request on a route goes."""

    compiled: CompiledRoute
    variant: Variant
    shadow: Shadow | None  # set when this request is also mirrored to the route's shadow

    @property
    def route(self) -> str:
        return self.compiled.route.name


class Router:
    def __init__(self, store: RouteStore, experiments: Experiments, rng: random.Random | None = None) -> None:
        self.store = store
        self.experiments = experiments
        self._rng = rng or random.Random()

    @classmethod
    def from_settings(cls, settings: RoutingSettings) -> Router:
        """The router of the configured routes file (InvalidRoute or RoutesFileError when it cannot be used)."""
        store = RouteStore.open(settings.routes_file, settings.max_routes)
        return cls(store, Experiments(settings.feedback_retention, settings.latency_samples))

    def assign(self, route: str, user_key: str = "") -> Assignment:
        """The variant of ``user_key`` (sticky), or of a random bucket without one; rolls the shadow dice."""
        compiled = self.store.get(route)
        bucket = bucket_of(compiled.route.salt, user_key) if user_key else self._rng.randrange(BUCKETS)
        variant = compiled.route.variants[compiled.table[bucket]]
        shadow = compiled.route.shadow
        mirrored = shadow if shadow is not None and self._rng.random() * 100 < shadow.percent else None
        self.experiments.assigned(compiled, variant.name)
        return Assignment(compiled, variant, mirrored)

    def completed(self, assignment: Assignment, request_id: str, seconds: float) -> None:
        self.experiments.completed(assignment.compiled, assignment.variant.name, request_id, seconds)

    # ---------------------------------------------------------------------------------------------------- routes

    def routes(self) -> list[CompiledRoute]:
        return self.store.all()

    def has_route(self, name: str) -> bool:
        return name in self.store

    def set_route(self, route: Route) -> CompiledRoute:
        return self.store.set(route)

    def delete_route(self, name: str) -> None:
        self.store.delete(name)
        self.experiments.forget(name)

    # -------------------------------------------------------------------------------------------------- outcomes

    def served(self, request_id: str, visible: Callable[[str], bool] | None = None) -> Served:
        """Which route and variant served ``request_id`` (UnknownRequest when it is not remembered, or its route
        is not ``visible``)."""
        return self.experiments.served(request_id, visible)

    def feedback(self, request_id: str, good: bool | None, score: float | None) -> Served:
        served = self.experiments.served(request_id)
        try:
            current: CompiledRoute | None = self.store.get(served.route)
        except UnknownRoute:
            current = None
        return self.experiments.feedback(request_id, good, score, current)

    def report(self, route: str) -> RouteReport:
        compiled = self.store.get(route)
        return build_report(compiled, self.experiments.snapshot(compiled))

    def sample_ratios(self) -> list[tuple[CompiledRoute, SampleRatio | None]]:
        """Every route's sample-ratio check (for metrics)."""
        return [(c, sample_ratio(c, self.experiments.snapshot(c))) for c in self.store.all()]
