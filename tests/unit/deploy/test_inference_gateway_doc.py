"""deploy/inference-gateway.md names only metrics the server exports and settings server/config.py has."""

from __future__ import annotations

import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.config import ObservabilitySettings, Settings
from loraplex.server.core.types import EngineStats
from loraplex.server.observability.telemetry import Telemetry
from tests.support.deploy.files import DEPLOY

DOC = DEPLOY / "inference-gateway.md"


def exported() -> set[str]:
    telemetry = Telemetry(ObservabilitySettings())
    telemetry.attach_engine(
        lambda: EngineStats(0, 0, 0.0, 0, 0),
        queue_capacity=1,
        manifest_of=lambda adapter_id: None,
        build={"version": "0", "base_model": "b", "quantization": "none"},
        adapters=lambda: [],
    )
    text = generate_latest(telemetry.registry).decode()
    return {family.name for family in text_string_to_metric_families(text)}


def test_every_metric_it_names_is_exported() -> None:
    named = set(re.findall(r"`(loraplex_[a-z_]+)", DOC.read_text()))
    assert {"loraplex_waiting_requests", "loraplex_kv_cache_usage_ratio", "loraplex_lora_requests_info"} <= named
    assert named <= exported(), named - exported()


def test_every_setting_it_names_is_a_setting() -> None:
    named = re.findall(rf"`({'|'.join(Settings.model_fields)})\.([a-z_]+)`", DOC.read_text())
    assert named
    for section, field in named:
        assert field in type(getattr(Settings(), section)).model_fields, f"{section}.{field}"
