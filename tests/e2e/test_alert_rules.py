"""The ops files check out with Prometheus's own tools: the scrape config and the alert rules are valid, and the
alert rules pass their promtool unit tests (each alert fires in its case and stays quiet in the other)."""

from __future__ import annotations

import subprocess

import yaml

from tests.e2e.prometheus import PROMETHEUS_DIR, binary

# What the alerts must cover (the list) -> the alert that does.
COVERAGE = {
    "p99 latency": "LoraplexHighTimeToFirstTokenP99",
    "p99 end-to-end latency": "LoraplexHighRequestLatencyP99",
    "error ratio": "LoraplexHighErrorRatio",
    "queue saturation": "LoraplexQueueSaturation",
    "adapter load failures": "LoraplexAdapterLoadFailures",
    "drift above threshold": "LoraplexAdapterDrift",
    "sample-ratio mismatch": "LoraplexSampleRatioMismatch",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_scrape_config_and_rules_are_valid() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_the_required_ones_exist() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {rule["alert"] for rule in rules}
    assert set(COVERAGE.values()) <= alerts
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert fired == alerts
