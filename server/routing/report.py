"""The A/B report of a route: per variant its traffic, outcomes with 95 % intervals, latency percentiles and tests
against the control, and the route's sample-ratio check. Plain values; the math is in :mod:`abstats`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from loraplex.server.routing import abstats
from loraplex.server.routing.abstats import Comparison, Interval, SampleRatio
from loraplex.server.routing.experiments import VariantStats
from loraplex.server.routing.store import CompiledRoute


@dataclass(frozen=True)
class VariantReport:
    name: str
    adapter: str
    weight: float
    control: bool
    requests: int  # assigned to the variant
    completed: int
    labelled: int  # feedback with a good/bad label
    positives: int
    positive_rate: float | None
    positive_rate_ci: Interval | None  # Wilson, 95 %
    scored: int  # feedback with a score
    mean_score: float | None
    mean_score_ci: Interval | None  # Student t, 95 %
    latency_p50: float | None  # seconds, end to end on the server
    latency_p95: float | None
    positive_rate_test: Comparison | None  # two-proportion z-test against the control
    mean_score_test: Comparison | None  # Welch's t-test against the control


@dataclass(frozen=True)
class RouteReport:
    route: str
    control: str
    since: float  # wall-clock start of the experiment
    variants: tuple[VariantReport, ...]
    sample_ratio: SampleRatio | None  # chi-square of requests against the weights


def sample_ratio(compiled: CompiledRoute, stats: Mapping[str, VariantStats]) -> SampleRatio | None:
    variants = compiled.route.variants
    return abstats.sample_ratio_test([stats[v.name].assigned for v in variants], [v.weight for v in variants])


def build_report(compiled: CompiledRoute, stats: Mapping[str, VariantStats]) -> RouteReport:
    route = compiled.route
    control = stats[route.control]
    reports: list[VariantReport] = []
    for variant in route.variants:
        own = stats[variant.name]
        is_control = variant.name == route.control
        latencies = list(own.latencies)
        reports.append(
            VariantReport(
                name=variant.name,
                adapter=variant.adapter,
                weight=variant.weight,
                control=is_control,
                requests=own.assigned,
                completed=own.completed,
                labelled=own.labelled,
                positives=own.positives,
                positive_rate=own.positives / own.labelled if own.labelled else None,
                positive_rate_ci=abstats.wilson_interval(own.positives, own.labelled),
                scored=own.scores.n,
                mean_score=own.scores.mean if own.scores.n else None,
                mean_score_ci=abstats.mean_interval(own.scores),
                latency_p50=abstats.percentile(latencies, 50),
                latency_p95=abstats.percentile(latencies, 95),
                positive_rate_test=None
                if is_control
                else abstats.two_proportion_z_test(
                    (control.positives, control.labelled), (own.positives, own.labelled)
                ),
                mean_score_test=None if is_control else abstats.welch_t_test(control.scores, own.scores),
            )
        )
    return RouteReport(route.name, route.control, compiled.since, tuple(reports), sample_ratio(compiled, stats))
