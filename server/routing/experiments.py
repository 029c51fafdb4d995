"""Per-route, per-variant A/B statistics kept in memory: assignments, completions, latency samples and feedback,
and the bounded memory of which routed request went to which variant (for ``Feedback``).

Statistics belong to one experiment of a route: they restart when its variants, weights or salt change (a changed
shadow keeps them), and they are lost when the server restarts. The request memory is an LRU of
``routing.feedback_retention`` request ids; feedback for an id it forgot is refused (NOT_FOUND).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.server.routing.abstats import Moments
from loraplex.server.routing.errors import FeedbackExists, InvalidFeedback, StaleFeedback, UnknownRequest
from loraplex.server.routing.store import CompiledRoute


@dataclass
class VariantStats:
    latency_samples: int
    assigned: int = 0
    completed: int = 0
    positives: int = 0
    negatives: int = 0
    scores: Moments = field(default_factory=Moments)
    latencies: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.latency_samples)

    @property
    def labelled(self) -> int:
        return self.positives + self.negatives


@dataclass
class RouteStats:
    since: float
    variants: dict[str, VariantStats]


@dataclass
class Served:
    """A routed request the server remembers for feedback."""

    route: str
    variant: str
    since: float
    rated: bool = False


class Experiments:
    def __init__(self, retention: int, latency_samples: int) -> None:
        self._retention = retention
        self._latency_samples = latency_samples
        self._routes: dict[str, RouteStats] = {}
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()

    def _stats(self, compiled: CompiledRoute) -> RouteStats:
        """The statistics of ``compiled``'s experiment, started afresh when the route's experiment changed."""
        name = compiled.route.name
        stats = self._routes.get(name)
        if stats is None or stats.since != compiled.since:
            variants = {v.name: VariantStats(self._latency_samples) for v in compiled.route.variants}
            stats = self._routes[name] = RouteStats(compiled.since, variants)
        return stats

    def assigned(self, compiled: CompiledRoute, variant: str) -> None:
        with self._lock:
            self._stats(compiled).variants[variant].assigned += 1

    def completed(self, compiled: CompiledRoute, variant: str, request_id: str, seconds: float) -> None:
        """A routed request finished: count it, keep its latency, remember it for feedback."""
        with self._lock:
            stats = self._stats(compiled).variants[variant]
            stats.completed += 1
            stats.latencies.append(seconds)
            self._served[request_id] = Served(compiled.route.name, variant, compiled.since)
            self._served.move_to_end(request_id)
            while len(self._served) > self._retention:
                self._served.popitem(last=False)

    def served(self, request_id: str, visible: Callable[[str], bool] | None = None) -> Served:
        """What served ``request_id``; UnknownRequest when it is not remembered, or when its route is not
        ``visible`` to the caller (another tenant learns neither the route nor that the request exists)."""
        with self._lock:
            served = self._served.get(request_id)
        if served is None or (visible is not None and not visible(served.route)):
            raise UnknownRequest(
                f"no routed request '{request_id}' is remembered: feedback must name the request_id of a request "
                f"served through a route, among the last {self._retention} (routing.feedback_retention)"
            )
        return served

    def feedback(
        self, request_id: str, good: bool | None, score: float | None, current: CompiledRoute | None
    ) -> Served:
        """Records one outcome (a good/bad label, a score, or both) for ``request_id``; ``current`` is its route now."""
        if good is None and score is None:
            raise InvalidFeedback("feedback needs a label (good or bad), a score, or both")
        if score is not None and not math.isfinite(score):
            raise InvalidFeedback(f"the score must be a finite number (got {score})")
        with self._lock:
            served = self._served.get(request_id)
            if served is None:
                raise UnknownRequest(f"no routed request '{request_id}' is remembered")
            if served.rated:
                raise FeedbackExists(f"feedback for request '{request_id}' was already recorded; send one per request")
            if current is None or current.since != served.since:
                raise StaleFeedback(
                    f"route '{served.route}' was changed or deleted after request '{request_id}' was served; its "
                    "experiment restarted, so this feedback is not counted"
                )
            stats = self._stats(current).variants[served.variant]
            if good is not None:
                if good:
                    stats.positives += 1
                else:
                    stats.negatives += 1
            if score is not None:
                stats.scores.add(score)
            served.rated = True
            return served

    def snapshot(self, compiled: CompiledRoute) -> dict[str, VariantStats]:
        """A copy of the variants' statistics of ``compiled``'s current experiment."""
        with self._lock:
            stats = self._stats(compiled)
            copies: dict[str, VariantStats] = {}
            for name, variant in stats.variants.items():
                copy = VariantStats(
                    self._latency_samples,
                    variant.assigned,
                    variant.completed,
                    variant.positives,
                    variant.negatives,
                    Moments(variant.scores.n, variant.scores.mean, variant.scores.m2),
                )
                copy.latencies.extend(variant.latencies)
                copies[name] = copy
            return copies

    def forget(self, route: str) -> None:
        with self._lock:
            self._routes.pop(route, None)
