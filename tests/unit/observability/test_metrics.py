"""The metrics: every name the architecture lists is exported with its labels, units and buckets; engine events,
request records and scrape-time state land where they should; the adapter label stays bounded."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.config import ObservabilitySettings
from loraplex.server.core.types import EngineStats, Finished, FinishReason, Timings, Usage
from loraplex.server.observability.labels import OTHER, LabelBounder
from loraplex.server.observability.metrics import REQUEST_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, RouteGauges
from loraplex.server.observability.telemetry import RequestLabels, RequestTiming, Telemetry

# ../shared/ARCHITECTURE.md, "Metric names", with the labels each carries.
ARCHITECTURE = {
    "loraplex_requests": ("counter", {"adapter", "route", "variant", "status"}),
    "loraplex_request_duration_seconds": ("histogram", {"adapter", "route", "variant"}),
    "loraplex_time_to_first_token_seconds": ("histogram", {"adapter", "route", "variant"}),
    "loraplex_time_per_output_token_seconds": ("histogram", {"adapter", "route", "variant"}),
    "loraplex_queue_wait_seconds": ("histogram", {"adapter", "route", "variant"}),
    "loraplex_prompt_tokens": ("counter", {"adapter", "route", "variant"}),
    "loraplex_generated_tokens": ("counter", {"adapter", "route", "variant"}),
    "loraplex_running_requests": ("gauge", set()),
    "loraplex_waiting_requests": ("gauge", set()),
    "loraplex_kv_cache_usage_ratio": ("gauge", set()),
    "loraplex_batch_size": ("histogram", set()),
    "loraplex_batch_adapters": ("histogram", set()),
    "loraplex_adapter_loads": ("counter", {"tier", "outcome"}),
    "loraplex_adapter_load_seconds": ("histogram", {"tier"}),
    "loraplex_adapter_evictions": ("counter", {"tier"}),
    "loraplex_adapters_resident": ("gauge", {"tier"}),
    "loraplex_adapter_cache_requests": ("counter", {"tier", "result"}),
    "loraplex_route_assignments": ("counter", {"route", "variant"}),
    "loraplex_feedback": ("counter", {"route", "variant", "outcome"}),
    "loraplex_drift_score": ("gauge", {"adapter", "feature", "method"}),
    "loraplex_build_info": ("gauge", {"version", "base_model", "quantization"}),
    "loraplex_prefix_cache_hit_tokens": ("counter", set()),
    "loraplex_prefix_cache_lookups": ("counter", {"result"}),
    "loraplex_prefix_cache_blocks": ("gauge", set()),
    "loraplex_prefix_cache_evictions": ("counter", set()),
    # Beyond the architecture's list: what the queue-saturation and sample-ratio alerts need, the hit ratio's base.
    "loraplex_queue_capacity": ("gauge", set()),
    "loraplex_prefix_cache_prompt_tokens": ("counter", set()),
    "loraplex_route_variant_weight": ("gauge", {"route", "variant"}),
    "loraplex_route_srm_p_value": ("gauge", {"route"}),
}


def finished(adapter_id: str | None, prompt: int = 12, completion: int = 5) -> Finished:
    return Finished(
        FinishReason.LENGTH,
        Usage(prompt, completion),
        Timings(0.25, 0.5, 1.0),
        adapter_id,
        1,
        "",
        mean_logprob=-0.5,
        prompt_embedding=(0.0, 1.0),
    )


def busy_telemetry(settings: ObservabilitySettings | None = None) -> Telemetry:
    telemetry = Telemetry(
        settings or ObservabilitySettings(drift_window=10, drift_min_samples=1, drift_reference_size=10)
    )
    telemetry.attach_engine(
        lambda: EngineStats(
            running=3, waiting=2, kv_cache_usage=0.4, adapters_on_device=5, adapters_on_host=7, prefix_cache_blocks=9
        ),
        queue_capacity=64,
        manifest_of=lambda adapter_id: None,
        build={"version": "0.1.0", "base_model": "embedded", "quantization": "none"},
    )
    telemetry.attach_routes(lambda: [RouteGauges("bot", {"a": 70.0, "b": 30.0}, 0.5)])
    listener = telemetry.listener
    listener.step(rows=40, sequences=6, adapters=3, seconds=0.01)
    listener.adapter_lookup("host", hit=False)
    listener.adapter_loaded("host", "ok", 0.2)
    listener.adapter_loaded("device", "rejected", 0.0)
    listener.adapter_evicted("device")
    listener.preempted(tokens=30)
    listener.preempted(tokens=12)
    listener.prefix_lookup(prompt_tokens=40, cached_tokens=32)
    listener.prefix_lookup(prompt_tokens=20, cached_tokens=0)
    listener.prefix_evicted(blocks=3)
    labels = RequestLabels("sup", "bot", "a")
    for _ in range(20):
        telemetry.request_succeeded(labels, RequestTiming(100.0, 100.5, 102.5), finished("sup"))
    telemetry.request_failed(RequestLabels("missing"), "not_found")
    telemetry.route_assigned("bot", "a")
    telemetry.feedback("bot", "a", "good")
    return telemetry


def families(telemetry: Telemetry) -> dict[str, object]:
    text = generate_latest(telemetry.registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_every_architecture_metric_is_exported_with_its_labels() -> None:
    exported = families(busy_telemetry())
    for name, (kind, labels) in ARCHITECTURE.items():
        family = exported.get(name)
        assert family is not None, f"{name} is not exported"
        assert family.type == kind, name  # type: ignore[attr-defined]
        sample_labels = {key for s in family.samples for key in s.labels} - {"le"}  # type: ignore[attr-defined]
        assert sample_labels == labels, name


def sample(telemetry: Telemetry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return telemetry.registry.get_sample_value(name, labels or {})


def test_values_land_where_they_should() -> None:
    telemetry = busy_telemetry()
    request = {"adapter": "sup", "route": "bot", "variant": "a"}
    assert sample(telemetry, "loraplex_requests_total", {**request, "status": "ok"}) == 20
    assert (
        sample(
            telemetry, "loraplex_requests_total", {"adapter": OTHER, "route": "", "variant": "", "status": "not_found"}
        )
        == 1
    )
    assert sample(telemetry, "loraplex_request_duration_seconds_sum", request) == 20 * 2.5
    assert sample(telemetry, "loraplex_time_to_first_token_seconds_sum", request) == 20 * 0.5
    assert sample(telemetry, "loraplex_time_per_output_token_seconds_sum", request) == 20 * 0.5  # 2 s / 4 tokens
    assert sample(telemetry, "loraplex_queue_wait_seconds_sum", request) == 20 * 0.25
    assert sample(telemetry, "loraplex_prompt_tokens_total", request) == 240
    assert sample(telemetry, "loraplex_generated_tokens_total", request) == 100
    assert sample(telemetry, "loraplex_batch_size_sum") == 6 and sample(telemetry, "loraplex_batch_adapters_sum") == 3
    assert sample(telemetry, "loraplex_adapter_cache_requests_total", {"tier": "host", "result": "miss"}) == 1
    assert sample(telemetry, "loraplex_adapter_loads_total", {"tier": "device", "outcome": "rejected"}) == 1
    assert sample(telemetry, "loraplex_adapter_loads_total", {"tier": "host", "outcome": "error"}) == 0  # pre-made
    assert sample(telemetry, "loraplex_adapter_load_seconds_count", {"tier": "host"}) == 1
    assert sample(telemetry, "loraplex_adapter_evictions_total", {"tier": "device"}) == 1
    assert sample(telemetry, "loraplex_preemptions_total") == 2
    assert sample(telemetry, "loraplex_preempted_tokens_total") == 42
    assert sample(telemetry, "loraplex_prefix_cache_lookups_total", {"result": "hit"}) == 1
    assert sample(telemetry, "loraplex_prefix_cache_lookups_total", {"result": "miss"}) == 1
    assert sample(telemetry, "loraplex_prefix_cache_hit_tokens_total") == 32
    assert sample(telemetry, "loraplex_prefix_cache_prompt_tokens_total") == 60
    assert sample(telemetry, "loraplex_prefix_cache_evictions_total") == 3
    assert sample(telemetry, "loraplex_prefix_cache_blocks") == 9
    assert sample(telemetry, "loraplex_running_requests") == 3 and sample(telemetry, "loraplex_waiting_requests") == 2
    assert sample(telemetry, "loraplex_queue_capacity") == 64
    assert sample(telemetry, "loraplex_kv_cache_usage_ratio") == 0.4
    assert sample(telemetry, "loraplex_adapters_resident", {"tier": "host"}) == 7
    assert sample(telemetry, "loraplex_route_variant_weight", {"route": "bot", "variant": "b"}) == 30
    assert sample(telemetry, "loraplex_route_srm_p_value", {"route": "bot"}) == 0.5
    assert sample(telemetry, "loraplex_feedback_total", {"route": "bot", "variant": "a", "outcome": "good"}) == 1
    assert (
        sample(telemetry, "loraplex_build_info", {"version": "0.1.0", "base_model": "embedded", "quantization": "none"})
        == 1
    )
    drift = {"adapter": "sup", "feature": "prompt_tokens", "method": "psi"}
    assert sample(telemetry, "loraplex_drift_score", drift) == 0.0  # ten equal requests, then ten more


def test_buckets_span_milliseconds_to_minutes() -> None:
    assert REQUEST_BUCKETS[0] <= 0.01 and REQUEST_BUCKETS[-1] >= 600
    assert TTFT_BUCKETS[0] <= 0.005 and TTFT_BUCKETS[-1] >= 120
    assert TPOT_BUCKETS[0] <= 0.001 and TPOT_BUCKETS[-1] >= 1
    assert all(sorted(b) == list(b) for b in (REQUEST_BUCKETS, TTFT_BUCKETS, TPOT_BUCKETS))


def test_ten_thousand_adapters_stay_within_the_label_bound() -> None:
    telemetry = Telemetry(ObservabilitySettings(max_adapter_labels=50, drift_min_samples=1, drift_reference_size=10))
    for i in range(10_000):
        telemetry.request_failed(RequestLabels(f"typo-{i}"), "not_found")  # unknown ids take no room
        telemetry.request_succeeded(RequestLabels(f"adapter-{i}"), RequestTiming(0, 0.1, 0.2), finished(f"adapter-{i}"))
    adapters = {
        s.labels["adapter"]
        for family in families(telemetry).values()
        for s in family.samples  # type: ignore[attr-defined]
        if "adapter" in s.labels
    }
    assert len(adapters) == 51 and OTHER in adapters and not any(a.startswith("typo") for a in adapters)
    assert {s.adapter for s in telemetry.drift.scores()} <= adapters - {OTHER}


def test_the_bounder_keeps_the_first_values() -> None:
    bounder = LabelBounder(2)
    assert [bounder.admit(v) for v in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert (bounder.known("b"), bounder.known("c")) == ("b", OTHER)
