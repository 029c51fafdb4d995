"""The routing and observability settings: defaults, flags, and refusals that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.server.config import SettingsError, load_settings, settings_from_argv


def test_defaults_and_flags() -> None:
    settings = load_settings(environ={})
    assert (settings.routing.routes_file, settings.routing.feedback_retention) == (None, 100_000)
    assert (settings.observability.max_adapter_labels, settings.observability.drift_window) == (100, 500)
    assert settings.server.metrics_host is None
    flagged = settings_from_argv(
        [
            "--routes-file",
            "r.yaml",
            "--routing.shadow-max-inflight",
            "3",
            "--observability.drift-window",
            "50",
            "--observability.drift-min-samples",
            "20",
        ]
    )
    assert flagged.routing.routes_file == Path("r.yaml") and flagged.routing.shadow_max_inflight == 3
    assert flagged.observability.drift_window == 50
    from_env = load_settings(environ={"LORAPLEX_OBSERVABILITY__MAX_ADAPTER_LABELS": "7"})
    assert from_env.observability.max_adapter_labels == 7


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"observability": {"drift_min_samples": 600}}, "drift_min_samples (600) exceeds observability.drift_window"),
        ({"observability": {"max_adapter_labels": 0}}, "observability.max_adapter_labels"),
        ({"routing": {"shadow_shed_queue_fraction": 1.5}}, "routing.shadow_shed_queue_fraction"),
        ({"routing": {"feedback_retention": 0}}, "routing.feedback_retention"),
        ({"routing": {"colour": "red"}}, "routing.colour"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, dict[str, object]], says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, overrides=overrides)
    assert says in str(raised.value)
