"""The server's rooms import downwards only (engine → model → lora → core), as shared/ARCHITECTURE.md asks: a
module of a lower room that imports a higher one (at the top or inside a function) fails here, naming the line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
# Each room and the rooms it must never import.
FORBIDDEN = {
    "core": ("engine", "model", "lora", "api", "routing", "observability"),
    "lora": ("engine", "model", "api"),
    "model": ("engine", "api"),
    "engine": ("api",),
}


def _imported_rooms(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["loraplex", "server"] and len(parts) > 2:
                found.append((node.lineno, parts[2]))
    return found


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_downwards(room: str) -> None:
    offending = [
        f"{path.relative_to(SERVER)}:{line} imports server.{imported}"
        for path in sorted((SERVER / room).rglob("*.py"))
        for line, imported in _imported_rooms(path)
        if imported in FORBIDDEN[room]
    ]
    assert not offending, offending
