"""deploy/compose, checked statically (no Docker engine here): the files parse, every path they mount exists, the
ports they publish are the ones the server listens on, and Prometheus and Grafana are wired to each other and to
loraplex the way the shipped scrape config, data source and dashboard provisioning expect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from loraplex.server.config import Settings
from tests.support.deploy.files import DEPLOY, DOCKERFILE, REPO, effective_settings, image_env

COMPOSE = DEPLOY / "compose"
Service = dict[str, Any]


def load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((COMPOSE / name).read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("compose.yaml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    return dict(compose["services"])


def mounts(service: Service) -> dict[str, str]:
    """Container path → source: a host path (resolved against the compose directory) or a named volume."""
    found: dict[str, str] = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        found[target] = str((COMPOSE / source).resolve()) if source.startswith((".", "/")) else source
    return found


def published(service: Service) -> dict[int, str]:
    """Container port → host address it is published on ("127.0.0.1:50051:50051" style)."""
    ports: dict[int, str] = {}
    for entry in service.get("ports", []):
        host, host_port, container_port = str(entry).rsplit(":", 2)
        ports[int(container_port)] = f"{host}:{host_port}"
    return ports


def interpolate(value: object) -> str:
    """Compose's ``${NAME:-default}`` with NAME unset: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def server_settings(service: Service, variant: str, scratch: Path) -> Settings:
    env = {**image_env(variant), **{k: interpolate(v) for k, v in service.get("environment", {}).items()}}
    return effective_settings(None, env, scratch)


def test_every_bind_mount_exists_and_every_named_volume_is_declared(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in services.items():
        for target, source in mounts(service).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} (mounted at {target}) does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_loraplex_builds_the_image_and_publishes_the_ports_it_listens_on(
    services: dict[str, Service], tmp_path: Path
) -> None:
    loraplex = services["loraplex"]
    build = loraplex["build"]
    assert (COMPOSE / build["context"]).resolve() == REPO
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    variant = build["args"]["VARIANT"]
    assert loraplex["image"].endswith(f":{variant}")
    settings = server_settings(loraplex, variant, tmp_path)  # valid: auth is decided (loopback-only publishing)
    ports = published(loraplex)
    assert set(ports) == {settings.server.port, settings.server.metrics_port, settings.server.http_port}
    assert all(address.startswith("127.0.0.1:") for address in ports.values()), "no auth: loopback only"
    volumes = mounts(loraplex)
    assert image_env(variant)["LORAPLEX_CACHE_DIR"] in volumes
    assert [str(root) for root in settings.adapters.roots] == ["/adapters"] and "/adapters" in volumes
    assert loraplex["stop_signal"] == "SIGTERM"
    assert int(loraplex["stop_grace_period"].removesuffix("s")) >= settings.server.grace_period_s + 5


def test_the_gpu_override_builds_the_cuda_variant_on_one_gpu(services: dict[str, Service], tmp_path: Path) -> None:
    override = load("compose.gpu.yaml")["services"]["loraplex"]
    assert override["build"]["args"]["VARIANT"] == "cuda" and override["image"].endswith(":cuda")
    (device,) = override["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    merged = {"environment": {**services["loraplex"]["environment"], **override["environment"]}}
    settings = server_settings(merged, "cuda", tmp_path)
    assert (settings.model.device, settings.model.quantization) == ("cuda", "nf4")
    assert settings.model.base_model == "embedded"  # until LORAPLEX_BASE_MODEL names a model directory


def test_prometheus_runs_our_scrape_config_against_the_loraplex_service(
    services: dict[str, Service], tmp_path: Path
) -> None:
    prometheus = services["prometheus"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    config_path = Path(flags["config.file"])
    config_dir = mounts(prometheus)[str(config_path.parent)]
    assert Path(config_dir) == DEPLOY / "prometheus"
    config = yaml.safe_load((Path(config_dir) / config_path.name).read_text())
    for rule_file in config["rule_files"]:
        assert (Path(config_dir) / rule_file).is_file(), f"rule file {rule_file} is not in the mounted directory"
    metrics_port = server_settings(services["loraplex"], "cpu", tmp_path).server.metrics_port
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert f"loraplex:{metrics_port}" in targets, f"no scrape target reaches the loraplex service: {targets}"
    assert mounts(prometheus)[flags["storage.tsdb.path"]] == "prometheus"
    assert 9090 in published(prometheus)


def test_grafana_gets_our_data_source_and_dashboard(services: dict[str, Service]) -> None:
    grafana = services["grafana"]
    volumes = mounts(grafana)
    provisioning = Path(volumes["/etc/grafana/provisioning"])
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname in services and url.port in published(services[url.hostname]), source["url"]
    providers = [yaml.safe_load(p.read_text()) for p in (provisioning / "dashboards").glob("*.y*ml")]
    paths = [provider["options"]["path"] for doc in providers for provider in doc["providers"]]
    assert paths and all(volumes.get(path) for path in paths), f"dashboard providers read unmounted paths: {paths}"
    for path in paths:
        assert list(Path(volumes[path]).glob("*.json")), f"no dashboard under {volumes[path]}"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (Path(volumes[str(home.parent)]) / home.name).is_file()
