"""The routes file (``routing.routes_file``): YAML read at start-up and rewritten atomically on every change.

Shape::

    routes:
      support-bot:
        control: v1
        salt: support-bot
        variants:
          - {name: v1, adapter: ticket-triage-v1, weight: 50}
          - {name: v2, adapter: ticket-triage-v2, weight: 50}
        shadow: {adapter: base, percent: 10}
        buckets: {v1: "0-4999", v2: "5000-9999"}   # written by the server: keeps users on their variant

``buckets`` is optional when writing a file by hand (variants then get contiguous ranges in order); when weights
in the file no longer match it, the table is rebalanced with the fewest moves. Writes go to a temporary file in
the same directory, are fsynced, renamed over the file, and the directory is fsynced: a crash leaves the old file
or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from loraplex.server.routing.bucketing import BucketTable, decode_ranges, encode_ranges
from loraplex.server.routing.errors import InvalidRoute, RoutesFileError
from loraplex.server.routing.routes import Route, route_from_spec

HEADER = (
    "# loraplex A/B routes: rewritten by the server on SetRoute and DeleteRoute (see server/routing/routes_file.py)\n"
)
Loaded = tuple[Route, list[str | None] | None]  # the route and its stored bucket owners (None: none stored)


def parse(text: str, source: str) -> dict[str, Loaded]:
    """Routes of a routes-file text; InvalidRoute (naming ``source``) when anything in it is wrong."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InvalidRoute(f"routes file {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"routes"}:
        raise InvalidRoute(f"routes file {source} must be a mapping with one key, 'routes' (name -> route)")
    routes = data.get("routes") or {}
    if not isinstance(routes, dict):
        raise InvalidRoute(f"routes file {source}: 'routes' must map route names to routes")
    loaded: dict[str, Loaded] = {}
    for name, spec in routes.items():
        if not isinstance(spec, dict):
            raise InvalidRoute(f"routes file {source}: route {name!r} must be a mapping (variants, control, ...)")
        body = {key: value for key, value in spec.items() if key != "buckets"}
        try:
            route = route_from_spec(str(name), body)
            buckets = spec.get("buckets")
            if buckets is not None and not isinstance(buckets, dict):
                raise InvalidRoute(f"route '{name}': buckets must map variant names to ranges like '0-4999'")
            owners = None if buckets is None else decode_ranges(route.name, buckets)
        except InvalidRoute as exc:
            raise InvalidRoute(f"routes file {source}: {exc}") from None
        loaded[route.name] = (route, owners)
    return loaded


def read(path: Path) -> dict[str, Loaded]:
    """The routes in ``path``; none when the file does not exist yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RoutesFileError(f"cannot read the routes file {path}: {exc}") from None
    return parse(text, str(path))


def render(routes: Sequence[tuple[Route, BucketTable]]) -> str:
    data: dict[str, Any] = {}
    for route, table in routes:
        data[route.name] = {**route.to_spec(), "buckets": encode_ranges(table, route.variants)}
    return HEADER + yaml.safe_dump({"routes": data}, sort_keys=False, default_flow_style=None, width=120)


def write_atomically(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text``: temporary file, fsync, rename, fsync of the directory."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename is done; some file systems cannot fsync a directory
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def write(path: Path, routes: Mapping[str, tuple[Route, BucketTable]]) -> None:
    """Writes every route to ``path`` atomically; RoutesFileError (nothing changed) when it cannot."""
    try:
        write_atomically(path, render([routes[name] for name in sorted(routes)]))
    except OSError as exc:
        raise RoutesFileError(f"cannot write the routes file {path}: {exc}; nothing was changed") from None
