"""Terminal text for A/B routes and their reports (``loraplex routes list``, ``loraplex ab report``)."""

from __future__ import annotations

from collections.abc import Sequence

from loraplex.client.render import table
from loraplex.client.types import Comparison, Interval, Route, RouteReport, VariantReport


def routes_table(routes: Sequence[Route]) -> str:
    if not routes:
        return "no routes"
    rows = [
        [
            r.name,
            ", ".join(f"{v.name}={v.adapter}:{v.weight:g}%" for v in r.variants),
            r.control,
            f"{r.shadow.adapter}:{r.shadow.percent:g}%" if r.shadow else "-",
            r.salt,
        ]
        for r in routes
    ]
    return table(["ROUTE", "VARIANTS", "CONTROL", "SHADOW", "SALT"], rows)


def _interval(interval: Interval | None, scale: float = 1.0, digits: int = 2) -> str:
    return "" if interval is None else f" [{interval.low * scale:.{digits}f}, {interval.high * scale:.{digits}f}]"


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def _versus(variant: VariantReport, test: Comparison | None, unit: str, scale: float, letter: str) -> str:
    if variant.control:
        return "(control)"
    if test is None:
        return "n/a"
    return f"{test.difference * scale:+.2f}{unit}, {letter}={test.statistic:.2f}, {_p(test.p_value)}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _row(v: VariantReport) -> list[str]:
    rate = (
        "-"
        if v.positive_rate is None
        else f"{v.positive_rate:.1%}{_interval(v.positive_rate_ci, 100, 1)} n={v.labelled}"
    )
    score = "-" if v.mean_score is None else f"{v.mean_score:.2f}{_interval(v.mean_score_ci)} n={v.scored}"
    return [
        v.name + (" *" if v.control else ""),
        v.adapter,
        f"{v.weight:g}%",
        str(v.requests),
        rate,
        _versus(v, v.positive_rate_test, " pp", 100, "z"),
        score,
        _versus(v, v.mean_score_test, "", 1, "t"),
        _seconds(v.latency_p50),
        _seconds(v.latency_p95),
    ]


def report_text(report: RouteReport) -> str:
    since = report.since.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    headers = [
        "VARIANT",
        "ADAPTER",
        "WEIGHT",
        "REQUESTS",
        "POSITIVE RATE [95% CI]",
        "VS CONTROL (z-test)",
        "MEAN SCORE [95% CI]",
        "VS CONTROL (Welch t)",
        "P50",
        "P95",
    ]
    lines = [
        f"route {report.route} · control {report.control} (*) · experiment since {since}",
        table(headers, [_row(v) for v in report.variants]),
    ]
    ratio = report.sample_ratio
    if ratio is None:
        lines.append("sample ratio: no requests yet")
    else:
        verdict = (
            "MISMATCH: traffic does not follow the weights; check assignment and logging before trusting results"
            if ratio.mismatch
            else "ok"
        )
        lines.append(
            f"sample ratio: chi²={ratio.chi_square:.2f} ({ratio.degrees_of_freedom} df), {_p(ratio.p_value)} "
            f"→ {verdict} (flagged when p<0.001)"
        )
    return "\n".join(lines)
