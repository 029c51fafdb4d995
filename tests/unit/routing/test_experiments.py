"""Feedback and per-variant statistics: bounded request memory, one outcome per request, experiments that restart
when users or weights change, and a report whose numbers are the hand-computed ones."""

from __future__ import annotations

import random

import pytest

from loraplex.server.routing.errors import FeedbackExists, InvalidFeedback, StaleFeedback, UnknownRequest
from loraplex.server.routing.experiments import Experiments
from loraplex.server.routing.router import Router
from loraplex.server.routing.routes import route_from_spec
from loraplex.server.routing.store import RouteStore

TWO = {"variants": [{"name": "a", "adapter": "x", "weight": 50}, {"name": "b", "adapter": "y", "weight": 50}]}


def make_router(retention: int = 1000) -> Router:
    store = RouteStore(None, 10)
    store.set(route_from_spec("r", TWO))
    return Router(store, Experiments(retention=retention, latency_samples=100), random.Random(7))


def serve(router: Router, request_id: str, user_key: str = "", seconds: float = 1.0) -> str:
    assignment = router.assign("r", user_key)
    router.completed(assignment, request_id, seconds)
    return assignment.variant.name


def key_for(router: Router, variant: str) -> str:
    return next(f"u{i}" for i in range(10_000) if router.assign("r", f"u{i}").variant.name == variant)


def test_feedback_is_counted_once_for_the_variant_that_served() -> None:
    router = make_router()
    variant = serve(router, "req-1")
    served = router.feedback("req-1", good=True, score=4.5)
    assert (served.route, served.variant) == ("r", variant)
    with pytest.raises(FeedbackExists, match="already recorded"):
        router.feedback("req-1", good=False, score=None)
    with pytest.raises(InvalidFeedback, match=r"a label .* a score, or both"):
        serve(router, "req-2")
        router.feedback("req-2", good=None, score=None)
    with pytest.raises(InvalidFeedback, match="finite"):
        router.feedback("req-2", good=None, score=float("inf"))
    with pytest.raises(UnknownRequest, match="no routed request 'nope'"):
        router.feedback("nope", good=True, score=None)


def test_the_request_memory_is_bounded() -> None:
    router = make_router(retention=3)
    for i in range(5):
        serve(router, f"req-{i}")
    with pytest.raises(UnknownRequest, match="among the last 3"):
        router.served("req-0")
    assert router.served("req-4").route == "r"
    router.feedback("req-2", good=True, score=None)


def test_a_weight_change_restarts_the_experiment_and_refuses_older_feedback() -> None:
    router = make_router()
    serve(router, "old")
    router.set_route(route_from_spec("r", {**TWO, "shadow": {"adapter": "base", "percent": 5}}))
    assert router.report("r").variants[0].requests + router.report("r").variants[1].requests == 1  # kept
    router.set_route(
        route_from_spec(
            "r",
            {"variants": [{"name": "a", "adapter": "x", "weight": 90}, {"name": "b", "adapter": "y", "weight": 10}]},
        )
    )
    assert sum(v.requests for v in router.report("r").variants) == 0
    with pytest.raises(StaleFeedback, match="experiment restarted"):
        router.feedback("old", good=True, score=None)
    router.delete_route("r")
    with pytest.raises(StaleFeedback):
        router.feedback("old", good=True, score=None)


def test_the_report_holds_the_hand_computed_statistics() -> None:
    router = make_router()
    a_key, b_key = key_for(router, "a"), key_for(router, "b")
    # a: 40 of 100 good, scores 1..5 repeated; b: 55 of 100 good, scores 2,4,..,10 repeated; latencies 1..100 ms.
    for i in range(100):
        for variant, key, good_below, score in (("a", a_key, 40, 1 + i % 5), ("b", b_key, 55, 2 * (1 + i % 5))):
            request_id = f"{variant}-{i}"
            assert serve(router, request_id, key, seconds=(i + 1) / 1000) == variant
            router.feedback(request_id, good=i < good_below, score=float(score))
    report = router.report("r")
    a, b = report.variants
    assert (report.control, a.control, b.control) == ("a", True, False)
    assert (a.requests, a.completed, a.labelled, a.positives, a.scored) == (100 + 1, 100, 100, 40, 100)
    assert a.positive_rate == 0.4 and b.positive_rate == 0.55
    assert a.mean_score == pytest.approx(3.0) and b.mean_score == pytest.approx(6.0)
    assert a.latency_p50 == pytest.approx(0.0505) and a.latency_p95 == pytest.approx(0.09505)
    assert a.positive_rate_test is None and a.mean_score_test is None
    # 40/100 vs 55/100: z = 2.12398, p = 0.033672 (see test_abstats)
    assert b.positive_rate_test is not None
    assert b.positive_rate_test.p_value == pytest.approx(0.0336721, abs=1e-7)
    # scores: sample variances 200/99 and 800/99 (population 2 and 8); t = 3 / √(2/99 + 8/99) = 9.439280
    assert b.mean_score_test is not None and b.mean_score_test.statistic == pytest.approx(9.439280, abs=1e-6)
    assert b.positive_rate_ci is not None and b.positive_rate_ci.low < 0.55 < b.positive_rate_ci.high
    assert report.sample_ratio is not None and not report.sample_ratio.mismatch  # about 100 each


def test_a_skewed_split_flags_a_sample_ratio_mismatch() -> None:
    router = make_router()
    a_key = key_for(router, "a")
    for i in range(300):
        serve(router, f"req-{i}", a_key)
    ratio = router.report("r").sample_ratio
    assert ratio is not None and ratio.mismatch and ratio.p_value < 1e-10
    assert router.sample_ratios()[0][1] == ratio


def test_a_request_on_a_route_the_caller_may_not_see_is_reported_as_unknown() -> None:
    router = make_router()
    serve(router, "theirs")
    with pytest.raises(UnknownRequest) as hidden:
        router.served("theirs", visible=lambda route: route != "r")
    with pytest.raises(UnknownRequest) as unknown:
        router.served("never-served", visible=lambda route: route != "r")
    assert str(hidden.value) == str(unknown.value).replace("never-served", "theirs")  # same answer, no route name
    assert router.served("theirs", visible=lambda route: route == "r").route == "r"
