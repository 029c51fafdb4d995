"""deploy/README.md stays true to the tree: every file it names exists, every setting it names is a setting of
server/config.py, every alert rule has a row that says what to do about it, and the benchmark section it cites is
in loadtests/BENCHMARKS.md."""

from __future__ import annotations

import re

import pytest
import yaml

from loraplex.server.config import Settings
from tests.support.deploy.files import DEPLOY, K8S, REPO

README = DEPLOY / "README.md"
# Where a relative path in the README may start: deploy/ itself (its table), deploy/k8s/ (the Kubernetes part) or
# the repository root (deploy/..., server/..., tests/...).
PATH_ROOTS = (DEPLOY, K8S, REPO)
# A backquoted relative path with a file name or a folder: `k8s/overlays/{cpu,gpu}`, `server/api/auth.py`.
PATH = re.compile(r"`((?:[\w.{},+-]+/)+[\w.{},+-]*)`")
# Kubernetes names that look like paths.
NOT_PATHS = {"nvidia.com/gpu"}
# A backquoted setting: `engine.kv_cache_tokens`, `model.device=cuda`, `server.tls_*`.
SETTING = re.compile(rf"`({'|'.join(Settings.model_fields)})\.([a-z_]+)(\*?)")


def readme() -> str:
    return README.read_text()


def expand(path: str) -> list[str]:
    """``k8s/overlays/{cpu,gpu}`` -> ``k8s/overlays/cpu``, ``k8s/overlays/gpu``."""
    found = re.search(r"\{([^}]*)\}", path)
    if found is None:
        return [path]
    return [path[: found.start()] + choice + path[found.end() :] for choice in found.group(1).split(",")]


def test_every_file_it_names_exists() -> None:
    paths = {path for path in PATH.findall(readme()) if not path.startswith(("/", "http"))} - NOT_PATHS
    assert {"docker/Dockerfile", "deploy/prometheus/alerts.yml", "tests/integration/deploy/test_scale_out.py"} <= paths
    for path in sorted(paths):
        for expanded in expand(path):
            assert any((root / expanded).exists() for root in PATH_ROOTS), (
                f"deploy/README.md names {expanded}, which is under none of deploy/, deploy/k8s/ or the repository"
            )


def test_every_setting_it_names_is_a_setting() -> None:
    named = SETTING.findall(readme())
    assert ("adapters", "device_slots", "") in named and ("engine", "kv_cache_tokens", "") in named
    for section, field, wildcard in named:
        fields = type(getattr(Settings(), section)).model_fields
        if wildcard:
            assert any(name.startswith(field) for name in fields), f"deploy/README.md: no setting {section}.{field}*"
        else:
            assert field in fields, f"deploy/README.md names {section}.{field}, which server/config.py does not have"


def alert_names() -> list[str]:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule["alert"] for group in alerts["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_rule_says_what_to_do() -> None:
    rows = {}
    for line in readme().splitlines():
        found = re.match(r"\| `(\w+)`[^|]*\|([^|]+)\|([^|]+)\|$", line)
        if found:
            rows[found.group(1)] = (found.group(2).strip(), found.group(3).strip())
    names = alert_names()
    assert names, "deploy/prometheus/alerts.yml has no alert rules"
    missing = set(names) - set(rows)
    assert not missing, f"alerts without a row in deploy/README.md: {missing}"
    for name in names:
        fires_when, what_to_do = rows[name]
        assert fires_when and len(what_to_do) > 40, f"deploy/README.md: the row of {name} says too little"
    assert not set(rows) - set(names), f"rows for alerts that no longer exist: {set(rows) - set(names)}"


@pytest.mark.parametrize("cited", re.findall(r"`loadtests/BENCHMARKS\.md` \(\*([^*]+)\*\)", README.read_text()))
def test_the_benchmark_section_it_cites_exists(cited: str) -> None:
    headings = [line.lstrip("#").strip() for line in (REPO / "loadtests" / "BENCHMARKS.md").read_text().splitlines()]
    assert cited in headings, f"deploy/README.md cites the section '{cited}' of loadtests/BENCHMARKS.md"
