"""Routing requests built from the client's types, and Routing responses turned back into them."""

from __future__ import annotations

from datetime import UTC

from loraplex.client.types import (
    Comparison,
    FeedbackResult,
    Interval,
    Route,
    RouteReport,
    SampleRatioCheck,
    Shadow,
    Variant,
    VariantReport,
)
from loraplex.proto.v1 import routing_pb2


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


def route(message: routing_pb2.Route) -> Route:
    return Route(
        name=message.name,
        variants=tuple(Variant(v.name, v.adapter_id, v.weight) for v in message.variants),
        control=message.control,
        salt=message.salt,
        shadow=Shadow(message.shadow.adapter_id, message.shadow.percent) if message.HasField("shadow") else None,
    )


def feedback_request(request_id: str, good: bool | None, score: float | None) -> routing_pb2.FeedbackRequest:
    if good is None:
        label = routing_pb2.FEEDBACK_LABEL_UNSPECIFIED
    else:
        label = routing_pb2.FEEDBACK_LABEL_GOOD if good else routing_pb2.FEEDBACK_LABEL_BAD
    request = routing_pb2.FeedbackRequest(request_id=request_id, label=label)
    if score is not None:
        request.score = score
    return request


def feedback_result(message: routing_pb2.FeedbackResponse) -> FeedbackResult:
    return FeedbackResult(message.route, message.variant)


def _optional(message: routing_pb2.VariantReport, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None  # type: ignore[arg-type]


def _interval(message: routing_pb2.VariantReport, field: str) -> Interval | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    value = getattr(message, field)
    return Interval(value.low, value.high)


def _comparison(message: routing_pb2.VariantReport, field: str) -> Comparison | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    value = getattr(message, field)
    return Comparison(value.difference, value.statistic, value.p_value)


def _variant_report(message: routing_pb2.VariantReport) -> VariantReport:
    return VariantReport(
        name=message.name,
        adapter=message.adapter_id,
        weight=message.weight,
        control=message.control,
        requests=message.requests,
        completed=message.completed,
        labelled=message.labelled,
        positives=message.positives,
        positive_rate=_optional(message, "positive_rate"),
        positive_rate_ci=_interval(message, "positive_rate_ci"),
        scored=message.scored,
        mean_score=_optional(message, "mean_score"),
        mean_score_ci=_interval(message, "mean_score_ci"),
        latency_p50=_optional(message, "latency_p50_seconds"),
        latency_p95=_optional(message, "latency_p95_seconds"),
        positive_rate_test=_comparison(message, "positive_rate_test"),
        mean_score_test=_comparison(message, "mean_score_test"),
    )


def route_report(message: routing_pb2.RouteReport) -> RouteReport:
    ratio = message.sample_ratio
    return RouteReport(
        route=message.route,
        control=message.control,
        since=message.since.ToDatetime(tzinfo=UTC),
        variants=tuple(_variant_report(v) for v in message.variants),
        sample_ratio=SampleRatioCheck(ratio.chi_square, ratio.degrees_of_freedom, ratio.p_value, ratio.mismatch)
        if message.HasField("sample_ratio")
        else None,
    )
