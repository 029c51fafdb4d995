"""The two distributions' package-dir mappings cover the tree exactly, without links, and their pins agree."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import loraplex.server

ROOT = Path(__file__).resolve().parents[3]
DISTRIBUTIONS = {"loraplex": ROOT, "loraplex-client": ROOT / "clients"}


def _setuptools(root: Path) -> dict[str, object]:
    table: dict[str, object] = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return table


def _project(root: Path) -> dict[str, object]:
    table: dict[str, object] = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return table


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
def test_listed_packages_are_the_folders_of_the_mapping(distribution: str) -> None:
    root = DISTRIBUTIONS[distribution]
    settings = _setuptools(root)
    mapping = settings["package-dir"]
    assert isinstance(mapping, dict)
    found = set()
    for package, folder in mapping.items():
        base = root / folder
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            found.add(".".join([package, *parts]))
    assert set(settings["packages"]) == found  # type: ignore[arg-type]


def test_no_symbolic_links_are_committed() -> None:
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line for line in listed.splitlines() if line.startswith("120000")] == []


def test_versions_and_pins_agree() -> None:
    client = _project(DISTRIBUTIONS["loraplex-client"])
    server = _project(ROOT)
    assert client["version"] == loraplex.server.__version__
    assert f"loraplex-client=={client['version']}" in server["dependencies"]  # type: ignore[operator]
    torch = next(d for d in server["dependencies"] if d.startswith("torch"))  # type: ignore[attr-defined]
    assert re.search(rf"^TORCH := {re.escape(torch)}$", (ROOT / "Makefile").read_text(), re.MULTILINE)


def test_locks_pin_exactly_with_hashes() -> None:
    """Every locked requirement is ``name==version`` with at least one sha256; serve.lock agrees with dev.lock."""
    pins: dict[str, dict[str, str]] = {}
    for name in ("dev", "serve"):
        text = (ROOT / "requirements" / f"{name}.lock").read_text()
        entries = re.findall(
            r"^([A-Za-z0-9_.\-\[\]]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M
        )
        requirements = [line for line in text.splitlines() if line and not line[0].isspace() and line[0] != "#"]
        assert len(entries) == len(requirements) > 0, name
        pins[name] = {package.lower(): version for package, version, _ in entries}
    assert pins["serve"].items() <= pins["dev"].items()
    assert "torch" not in pins["dev"]  # installed first, from the pyproject pin (the CPU build on disk)
    assert "kernels" not in pins["dev"]  # bitsandbytes would fetch hub kernels at run time with it


def test_importing_a_room_by_its_folder_name_is_refused() -> None:
    """From the repository root, ``import server`` would load a second copy of every module."""
    for room, package in (("server", "loraplex.server"), ("trainer", "loraplex.trainer")):
        done = subprocess.run(
            [sys.executable, "-c", f"import {room}"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert done.returncode == 1
        assert f"ImportError: import {package}, not {room}" in done.stderr
