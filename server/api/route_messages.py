"""loraplex.v1 Routing protobuf ⇄ routing value types. Pure functions: no I/O, no router, no gRPC context."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.proto.v1 import routing_pb2
from loraplex.server.routing.abstats import Comparison, Interval
from loraplex.server.routing.report import RouteReport, VariantReport
from loraplex.server.routing.routes import Route, route_from_spec


def route_of(message: routing_pb2.Route) -> Route:
    """The validated route of a message (InvalidRoute says what to fix)."""
    spec: dict[str, Any] = {
        "variants": [{"name": v.name, "adapter": v.adapter_id, "weight": v.weight} for v in message.variants]
    }
    if message.control:
        spec["control"] = message.control
    if message.salt:
        spec["salt"] = message.salt
    if message.HasField("shadow"):
        spec["shadow"] = {"adapter": message.shadow.adapter_id, "percent": message.shadow.percent}
    return route_from_spec(message.name, spec)


def route_message(route: Route) -> routing_pb2.Route:
    message = routing_pb2.Route(
        name=route.name,
        variants=[routing_pb2.Variant(name=v.name, adapter_id=v.adapter, weight=v.weight) for v in route.variants],
        control=route.control,
        salt=route.salt,
    )
    if route.shadow is not None:
        message.shadow.CopyFrom(routing_pb2.Shadow(adapter_id=route.shadow.adapter, percent=route.shadow.percent))
    return message


def _interval(interval: Interval | None) -> routing_pb2.Interval | None:
    return None if interval is None else routing_pb2.Interval(low=interval.low, high=interval.high)


def _comparison(comparison: Comparison | None) -> routing_pb2.Comparison | None:
    if comparison is None:
        return None
    return routing_pb2.Comparison(
        difference=comparison.difference, statistic=comparison.statistic, p_value=comparison.p_value
    )


def _variant_report(report: VariantReport) -> routing_pb2.VariantReport:
    return routing_pb2.VariantReport(
        name=report.name,
        adapter_id=report.adapter,
        weight=report.weight,
        control=report.control,
        requests=report.requests,
        completed=report.completed,
        labelled=report.labelled,
        positives=report.positives,
        positive_rate=report.positive_rate,
        positive_rate_ci=_interval(report.positive_rate_ci),
        scored=report.scored,
        mean_score=report.mean_score,
        mean_score_ci=_interval(report.mean_score_ci),
        latency_p50_seconds=report.latency_p50,
        latency_p95_seconds=report.latency_p95,
        positive_rate_test=_comparison(report.positive_rate_test),
        mean_score_test=_comparison(report.mean_score_test),
    )


def report_message(report: RouteReport) -> routing_pb2.RouteReport:
    since = Timestamp()
    since.FromNanoseconds(int(report.since * 1e9))
    message = routing_pb2.RouteReport(
        route=report.route,
        control=report.control,
        since=since,
        variants=[_variant_report(v) for v in report.variants],
    )
    if report.sample_ratio is not None:
        ratio = report.sample_ratio
        message.sample_ratio.CopyFrom(
            routing_pb2.SampleRatioCheck(
                chi_square=ratio.chi_square,
                degrees_of_freedom=ratio.degrees_of_freedom,
                p_value=ratio.p_value,
                mismatch=ratio.mismatch,
            )
        )
    return message
