"""End to end: a real Prometheus scrapes a running loraplex through deploy/prometheus/prometheus.yml (with its alert
rules) while a short load runs over two A/B routes with feedback and a shadow; then every PromQL expression of the
Grafana dashboard and of the alert rules runs through Prometheus's HTTP API: all must parse, every panel must have
data, and Prometheus must evaluate every rule without error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from loraplex.client import Client, NotFoundError
from loraplex.server.core.shape import ModelShape
from tests.e2e.prometheus import PROMETHEUS_DIR, REPO, Prometheus
from tests.integration.api.conftest import base_shape  # noqa: F401  (the shared fixture)
from tests.integration.routing.conftest import metrics_port
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "loraplex.json"
ROUTES = {
    "routes": {
        "support": {
            "variants": [
                {"name": "v1", "adapter": "e2e-a", "weight": 50},
                {"name": "v2", "adapter": "e2e-b", "weight": 50},
            ],
            "shadow": {"adapter": "e2e-shadow", "percent": 50},
        },
        "triage": {
            "variants": [
                {"name": "control", "adapter": "e2e-c", "weight": 70},
                {"name": "new", "adapter": "base", "weight": 30},
            ]
        },
    }
}
REQUESTS = 40  # over both routes
# Grafana's macros and the dashboard's variables, as Grafana would expand them for "All".
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "1s", "$adapter": ".*", "$route": ".*"}


def manifest(shape: ModelShape) -> dict[str, Any]:
    """A trainer manifest with reference statistics, so one adapter's drift runs against a trainer reference."""
    edges = [float(e) for e in range(0, 110, 10)]
    counts = [10] * 10
    histogram = {"edges": edges, "counts": counts}
    reference = {
        "num_examples": 100,
        "prompt_tokens": histogram,
        "output_tokens": {"edges": [0.0, 2.0, 4.0, 8.0], "counts": [30, 40, 30]},
        "mean_logprob": {"edges": [-5.0, -2.0, -1.0, 0.0], "counts": [30, 40, 30]},
        "embedding_centroid": [0.0] * shape.hidden_size,
        "embedding_distance": {"edges": [0.0, 1.0, 2.0, 4.0], "counts": [30, 40, 30]},
    }
    return {"base_fingerprint": "", "base_model": "embedded", "reference": reference}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Iterator[ServerProcess]:  # noqa: F811
    directory = tmp_path_factory.mktemp("e2e")
    root = directory / "adapters"
    for index, adapter_id in enumerate(("e2e-a", "e2e-b", "e2e-c", "e2e-shadow", "e2e-direct")):
        write_adapter(root / adapter_id, base_shape, rank=8, seed=500 + index, strength=2.0)
    (root / "e2e-a" / "loraplex.json").write_text(json.dumps(manifest(base_shape)))
    routes = directory / "routes.yaml"
    routes.write_text(yaml.safe_dump(ROUTES))
    flags = (
        f"--routes-file={routes}",
        "--adapters.device-slots=3",  # five adapters for three slots: evictions happen
        "--server.default-max-new-tokens=4",
        "--observability.drift-reference-size=5",
        "--observability.drift-min-samples=3",
        "--observability.drift-window=50",
    )
    with ServerProcess.start(directory / "server.log", [root], *flags) as process:
        yield process
        assert process.stop() == 0, process.log()[-3000:]


def run_load(target: str) -> None:
    """Requests over both routes (sticky keys), feedback for each, direct adapter and base calls, one failure."""
    with Client(target) as client:

        def one(index: int) -> None:
            route = "support" if index % 2 else "triage"
            result = client.generate(
                f"Ticket {index}: my order never arrived.", route=route, user_key=f"user-{index % 13}"
            )
            client.feedback(result.request_id, good=index % 3 != 0, score=float(index % 5))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(REQUESTS)))
        client.generate("Hello", adapter="e2e-direct")
        client.generate("Hello")
        with pytest.raises(NotFoundError):
            client.generate("Hello", adapter="no-such-adapter")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, server: ServerProcess) -> Iterator[Prometheus]:
    with Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{metrics_port(server)}") as running:
        run_load(server.target)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until a scrape after the load is stored
            result = running.query("sum(loraplex_route_assignments_total)")["data"]["result"]
            if result and float(result[0]["value"][1]) >= REQUESTS:
                break
            time.sleep(0.5)
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield running


def expand(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def test_the_dashboard_has_a_fixed_uid_and_every_section() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "loraplex"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Latency per adapter", "Adapter cache", "A/B routes", "Drift"]
    assert len(dashboard_targets()) >= 40


def test_every_alert_expression_parses_and_prometheus_evaluates_every_rule(prometheus: Prometheus) -> None:
    for name, expr in alert_exprs():
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (name, answer)
    rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(name for name, _ in alert_exprs())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_every_dashboard_expression_parses_and_has_data(prometheus: Prometheus) -> None:
    empty: list[str] = []
    for title, expr in dashboard_targets():
        answer = prometheus.query(expand(expr))
        assert answer["status"] == "success", (title, expr, answer)
        if not answer["data"]["result"]:
            empty.append(f"{title}: {expr}")
    assert empty == []


def test_the_dashboard_variables_find_their_values(prometheus: Prometheus) -> None:
    adapters = prometheus.api("label/adapter/values", **{"match[]": "loraplex_requests_total"})["data"]
    assert {"e2e-a", "e2e-b", "e2e-c", "e2e-shadow", "e2e-direct", "base"} <= set(adapters)
    routes = prometheus.api("label/route/values", **{"match[]": "loraplex_route_assignments_total"})["data"]
    assert set(routes) == {"support", "triage"}


def test_the_scraped_numbers_are_the_loads(prometheus: Prometheus) -> None:
    def value(expr: str) -> float:
        result = prometheus.query(expr)["data"]["result"]
        assert result, expr
        return float(result[0]["value"][1])

    assert value("sum(loraplex_route_assignments_total)") == REQUESTS
    assert value('sum(loraplex_feedback_total{outcome=~"good|bad"})') == REQUESTS
    assert value('sum(loraplex_requests_total{status="ok", variant!~"shadow:.*"})') == REQUESTS + 2
    assert value('sum(loraplex_requests_total{status="not_found"})') == 1
    assert value('sum(loraplex_adapter_evictions_total{tier="device"})') > 0
    assert value('count(loraplex_drift_score{adapter="e2e-a", method="psi"})') == 4  # the trainer reference
    assert value('count(loraplex_drift_score{adapter="e2e-b"})') == 8  # first-N reference: 4 features x 2
    assert value('loraplex_route_variant_weight{route="triage", variant="new"}') == 30
