"""The route store: every configured route with its bucket table, swapped atomically and persisted atomically.

Readers take the current mapping (never mutated after it is published), so a request sees a whole route, old or
new, never half of one. Writers are serialized: each builds a new mapping, writes the routes file (when one is
configured), and only then publishes the mapping; a failed write changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from loraplex.server.routing import routes_file
from loraplex.server.routing.bucketing import BucketTable, fresh_table, owners_of, rebalance
from loraplex.server.routing.errors import InvalidRoute, UnknownRoute
from loraplex.server.routing.routes import Route


@dataclass(frozen=True)
class CompiledRoute:
    route: Route
    table: BucketTable  # bucket -> index into route.variants
    since: float  # wall-clock start of the current experiment: statistics restart when users or weights change


def compile_route(route: Route, owners: list[str | None] | None, since: float) -> CompiledRoute:
    table = fresh_table(route.variants) if owners is None else rebalance(owners, route.variants)
    return CompiledRoute(route, table, since)


class RouteStore:
    def __init__(self, path: Path | None, max_routes: int, routes: Mapping[str, CompiledRoute] | None = None) -> None:
        """``path`` None keeps routes in memory only (lost at restart)."""
        self.path = path
        self.max_routes = max_routes
        self._routes: Mapping[str, CompiledRoute] = MappingProxyType(dict(routes or {}))
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | None, max_routes: int) -> RouteStore:
        """The store of the routes file ``path`` (empty when it does not exist yet); InvalidRoute when it is bad."""
        now = time.time()
        loaded = routes_file.read(path) if path is not None else {}
        if len(loaded) > max_routes:
            raise InvalidRoute(
                f"routes file {path} holds {len(loaded)} routes, more than routing.max_routes={max_routes}"
            )
        return cls(path, max_routes, {name: compile_route(r, owners, now) for name, (r, owners) in loaded.items()})

    def get(self, name: str) -> CompiledRoute:
        compiled = self._routes.get(name)
        if compiled is None:
            raise UnknownRoute(f"unknown route '{name}': no A/B route with this name is configured")
        return compiled

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    def all(self) -> list[CompiledRoute]:
        routes = self._routes
        return [routes[name] for name in sorted(routes)]

    def set(self, route: Route) -> CompiledRoute:
        """Adds or replaces ``route``, keeping each user's bucket on its variant where the new weights allow."""
        with self._write_lock:
            current = dict(self._routes)
            previous = current.get(route.name)
            if previous is None:
                if len(current) >= self.max_routes:
                    raise InvalidRoute(
                        f"{len(current)} routes are configured (routing.max_routes={self.max_routes}); delete one first"
                    )
                compiled = compile_route(route, None, time.time())
            else:
                owners = owners_of(previous.table, previous.route.variants)
                since = previous.since if route.same_experiment(previous.route) else time.time()
                compiled = compile_route(route, owners, since)
            current[route.name] = compiled
            self._publish(current)
            return compiled

    def delete(self, name: str) -> None:
        with self._write_lock:
            current = dict(self._routes)
            if current.pop(name, None) is None:
                raise UnknownRoute(f"unknown route '{name}': nothing to delete")
            self._publish(current)

    def _publish(self, routes: dict[str, CompiledRoute]) -> None:
        if self.path is not None:
            routes_file.write(self.path, {name: (c.route, c.table) for name, c in routes.items()})
        self._routes = MappingProxyType(routes)
