"""mypy over the package-dir mapping of both distributions, each module under its one real path.

The rooms are mapped folders (``server/`` -> ``loraplex.server``, ...; see the two pyproject.toml files), and mypy
cannot follow the import hook of a setuptools editable install, nor map a folder to another package name from its
config. This runs mypy's build on an explicit (path, module) list read from those same mappings, with the settings
of ``[tool.mypy]``: errors name the real files (``server/engine/engine.py``), as tracebacks and coverage do.

``python tools/typecheck.py`` (``make lint``) exits 1 on any error.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from mypy import build
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = (ROOT, ROOT / "clients")


def mapped_packages() -> dict[str, Path]:
    """Top-level mapped package name -> its folder, from every distribution's ``tool.setuptools.package-dir``."""
    mapping: dict[str, Path] = {}
    for root in DISTRIBUTIONS:
        settings = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
        for package, folder in settings["package-dir"].items():
            mapping[package] = (root / folder).resolve()
    return mapping


def sources(mapping: dict[str, Path]) -> Iterator[BuildSource]:
    """Every module of the mapped packages: the ``.pyi`` stub where one sits beside a ``.py``."""
    for package, folder in mapping.items():
        for path in sorted(folder.rglob("*.py*")):
            if path.suffix not in (".py", ".pyi") or (path.suffix == ".py" and path.with_suffix(".pyi").exists()):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield BuildSource(str(path.relative_to(ROOT)), ".".join([package, *parts]))


def main() -> int:
    found = list(sources(mapped_packages()))
    _, options = process_options(["--config-file", str(ROOT / "pyproject.toml"), found[0].path or ""])
    try:
        result = build.build(found, options)
        messages = result.errors
    except build.CompileError as exc:
        messages = exc.messages
    for message in messages:
        print(message)
    print(f"{'Found errors' if messages else 'Success: no issues found'} in {len(found)} source files")
    return 1 if messages else 0


if __name__ == "__main__":
    sys.exit(main())
