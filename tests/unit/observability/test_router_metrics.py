"""The metrics a LoRA-aware router reads: vLLM's adapter-activity gauge shape under our prefix (labels and a
timestamp value) and per-adapter residency, bounded like the ``adapter`` label and ordered pinned, device, host."""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.config import ObservabilitySettings
from loraplex.server.core.types import AdapterInfo, EngineStats, ResidencyTier
from loraplex.server.observability.telemetry import Telemetry


def info(adapter_id: str, tier: ResidencyTier, pinned: bool = False, rank: int = 8) -> AdapterInfo:
    return AdapterInfo(adapter_id, 1, "hash", rank, ("q_proj",), False, 1024, tier, pinned, 0.0, 0, "/x", ())


ADAPTERS = [
    info("h1", ResidencyTier.HOST),
    info("d2", ResidencyTier.DEVICE, rank=16),
    info("disk", ResidencyTier.DISK),
    info("loading", ResidencyTier.LOADING),
    info("p-host", ResidencyTier.HOST, pinned=True, rank=4),
    info("d1", ResidencyTier.DEVICE),
]


def scraped(stats: EngineStats, max_labels: int = 100) -> dict[str, list[tuple[dict[str, str], float]]]:
    telemetry = Telemetry(ObservabilitySettings(max_adapter_labels=max_labels))
    telemetry.attach_engine(
        lambda: stats,
        queue_capacity=8,
        manifest_of=lambda adapter_id: None,
        build={"version": "0", "base_model": "b", "quantization": "none"},
        adapters=lambda: ADAPTERS,
    )
    text = generate_latest(telemetry.registry).decode()
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def test_lora_requests_info_has_vllm_labels_and_the_scrape_time_as_value() -> None:
    stats = EngineStats(
        running=3,
        waiting=2,
        kv_cache_usage=0.5,
        adapters_on_device=2,
        adapters_on_host=3,
        running_adapters=("a", "b"),
        waiting_adapters=("b", "c"),
        device_slots=16,
    )
    before = time.time()
    [(labels, value)] = scraped(stats)["loraplex_lora_requests_info"]
    assert labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "b,c", "max_lora": "16"}
    assert before <= value <= time.time()


def test_lora_requests_info_is_empty_when_idle() -> None:
    stats = EngineStats(0, 0, 0.0, 0, 0, device_slots=4)
    [(labels, _)] = scraped(stats)["loraplex_lora_requests_info"]
    assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}


def test_residency_lists_adapters_in_memory_pinned_then_device_then_host() -> None:
    samples = scraped(EngineStats(0, 0, 0.0, 2, 3))["loraplex_adapter_residency"]
    assert [(s["adapter"], s["tier"], s["pinned"], s["rank"], v) for s, v in samples] == [
        ("p-host", "host", "true", "4", 1.0),
        ("d1", "device", "false", "8", 1.0),
        ("d2", "device", "false", "16", 1.0),
        ("h1", "host", "false", "8", 1.0),
    ]


def test_residency_is_bounded_by_max_adapter_labels() -> None:
    samples = scraped(EngineStats(0, 0, 0.0, 2, 3), max_labels=2)["loraplex_adapter_residency"]
    assert [s["adapter"] for s, _ in samples] == ["p-host", "d1"]
