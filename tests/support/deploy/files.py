"""The deployment files as the deploy tests read them: the Dockerfile's stages and environment, the rendered
Kustomize overlays, and the settings a container ends up with (settings file, then its environment)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.server.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"
VARIANTS = ("cpu", "cuda")
Manifest = dict[str, Any]


def require_tool(name: str, package: str) -> str:
    """The path of the command ``name``; fails the test (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"'{name}' is not installed: install the Debian package '{package}' (.ci/run does)")
    return path


# ------------------------------------------------------------------------------------------------------ Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.args("ENV"):
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                values[name] = value
        return values


def _logical_lines(text: str) -> list[str]:
    """Instructions one per line: comment lines dropped, backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return lines


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """The build stages by name (``FROM image AS name``), each with its instructions."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            found = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert found, f"every stage is named: FROM {args}"
            current = stages[found.group(2)] = Stage(name=found.group(2), base=found.group(1))
        elif current is not None:
            current.instructions.append((keyword, args.strip()))
    return stages


def image_env(variant: str) -> dict[str, str]:
    """The environment of the runtime image of ``variant``: its base stage's ENV, then the runtime stage's."""
    stages = dockerfile_stages()
    return {**stages[f"{variant}-base"].env(), **stages["runtime"].env()}


def loraplex_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if name.startswith("LORAPLEX_")}


def effective_settings(config_text: str | None, environ: Mapping[str, str], scratch: Path) -> Settings:
    """The settings the server builds from a settings file (None: none) and its environment, like at start-up."""
    config_file = None
    if config_text is not None:
        config_file = scratch / "config.yaml"
        config_file.write_text(config_text)
    return load_settings(config_file, environ=loraplex_env(environ))


# ------------------------------------------------------------------------------------------------------ Kustomize

_MIN_KUSTOMIZE = (4, 0)


def _kubectl() -> str:
    kubectl = require_tool("kubectl", "kubectl")
    version = json.loads(
        subprocess.run(
            [kubectl, "version", "--client", "-o", "json"], capture_output=True, check=True, text=True
        ).stdout
    )
    found = re.match(r"v?(\d+)\.(\d+)", version.get("kustomizeVersion", ""))
    if found is None or (int(found.group(1)), int(found.group(2))) < _MIN_KUSTOMIZE:
        pytest.fail(
            f"kubectl {version['clientVersion']['gitVersion']} bundles kustomize {version.get('kustomizeVersion')}; "
            "the overlays need kustomize >= 4 (kubectl >= 1.21)"
        )
    return kubectl


def kustomize(directory: Path) -> list[Manifest]:
    """The objects ``kubectl kustomize`` renders for ``directory`` (offline) with the default load restrictor, as
    ``kubectl apply -k``, Argo CD and Flux render it."""
    done = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    """The one object of ``kind`` whose name is ``name`` (or starts with ``name-`` and a Kustomize hash suffix)."""
    matches = [
        obj
        for obj in objects
        if obj["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", obj["metadata"]["name"])
    ]
    assert len(matches) == 1, f"expected one {kind} {name}, found {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def container(deployment: Manifest, name: str, init: bool = False) -> Manifest:
    spec = deployment["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, f"{deployment['metadata']['name']} has no container {name}"
    return dict(found[0])
