"""Route validation (every bad input says what to fix), the routes file, and the store's atomic swap and write."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.server.routing import routes_file
from loraplex.server.routing.errors import InvalidRoute, RoutesFileError, UnknownRoute
from loraplex.server.routing.routes import BASE_MODEL, route_from_spec
from loraplex.server.routing.store import RouteStore


def spec(*weights: float, **extra: Any) -> dict[str, Any]:
    return {"variants": [{"name": f"v{i}", "adapter": f"a{i}", "weight": w} for i, w in enumerate(weights)], **extra}


def test_defaults_control_and_salt() -> None:
    route = route_from_spec("support-bot", spec(50, 50, shadow={"adapter": "base", "percent": 5}))
    assert (route.control, route.salt) == ("v0", "support-bot")
    assert [v.adapter_id for v in route.variants] == ["a0", "a1"]
    assert route.shadow is not None and route.shadow.adapter_id is None and route.shadow.label == "shadow:base"
    assert route.adapters == ("a0", "a1")
    assert route_from_spec("team-a/bot", spec(100)).name == "team-a/bot"


@pytest.mark.parametrize(
    ("name", "body", "says"),
    [
        ("r", spec(60, 30), "weights must sum to 100 (got v0=60 + v1=30 = 90)"),
        ("r", spec(50.005, 49.995), "steps of 0.01"),
        ("r", spec(-10, 110), "percentage from 0 to 100"),
        ("r", spec(float("nan"), 100), "percentage from 0 to 100"),
        ("r", {"variants": []}, "variants: Tuple should have at least 1 item"),
        ("r", {}, "variants: Field required"),
        ("r", {"variants": [{"name": "a", "adapter": "x", "weight": 50}] * 2}, "unique (repeated: a)"),
        ("r", spec(100, control="nope"), "control 'nope' is not one of the variants"),
        ("r", spec(100, shadow={"adapter": "x", "percent": 0}), "shadow percent is in (0, 100]"),
        ("r", spec(100, shadow={"adapter": "x", "percent": 120}), "shadow percent is in (0, 100]"),
        ("r", spec(100, shadow={"adapter": "x"}), "shadow.percent: Field required"),
        ("r", {"variants": [{"name": "a", "adapter": "../etc", "weight": 100}]}, "is not a name"),
        ("r", {"variants": [{"name": "a", "adapter": "", "weight": 100}]}, "adapter: String should have at least"),
        ("r", {"variants": [{"name": "a b", "adapter": "x", "weight": 100}]}, "variants.0.name"),
        ("r", spec(100, colour="red"), "colour: Extra inputs are not permitted"),
        ("bad name", spec(100), "route name 'bad name' is not valid"),
        ("", spec(100), "route name '' is not valid"),
        (BASE_MODEL, spec(100), "and not 'base'"),
    ],
)
def test_bad_routes_say_what_to_fix(name: str, body: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRoute) as raised:
        route_from_spec(name, body)
    assert says in str(raised.value)


def test_every_problem_of_a_route_is_reported_at_once() -> None:
    with pytest.raises(InvalidRoute) as raised:
        route_from_spec("r", {"variants": [{"name": "a", "adapter": "x", "weight": 30}] * 2, "control": "z"})
    message = str(raised.value)
    assert "unique" in message and "sum to 100" in message and "control 'z'" in message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("routes: [", "not valid YAML"),
        ("- a\n- b\n", "one key, 'routes'"),
        ("routes: {r: 5}", "route 'r' must be a mapping"),
        (
            "routes: {r: {variants: [{name: a, adapter: x, weight: 90}]}}",
            "routes file f.yaml: route 'r': variant weights",
        ),
        ("routes: {r: {variants: [{name: a, adapter: x, weight: 100}], buckets: {a: '0-10001'}}}", "outside 0-9999"),
        ("extra: 1\nroutes: {}", "one key, 'routes'"),
    ],
)
def test_bad_routes_files_name_the_file_and_the_problem(text: str, says: str) -> None:
    with pytest.raises(InvalidRoute, match=None) as raised:
        routes_file.parse(text, "f.yaml")
    assert says in str(raised.value) and "f.yaml" in str(raised.value)


def test_a_missing_routes_file_is_an_empty_store(tmp_path: Path) -> None:
    assert RouteStore.open(tmp_path / "routes.yaml", 10).all() == []


def test_set_writes_the_file_and_a_new_store_reads_the_same_routes(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "routes.yaml"
    store = RouteStore.open(path, 10)
    store.set(route_from_spec("r", spec(34, 33, 33, shadow={"adapter": "base", "percent": 10})))
    changed = store.set(route_from_spec("r", spec(50, 25, 25)))
    store.set(route_from_spec("other", spec(100)))
    written = yaml.safe_load(path.read_text())
    assert list(written["routes"]) == ["other", "r"]
    assert written["routes"]["r"]["buckets"] == {
        "v0": "0-3399,5900-6699,9200-9999",
        "v1": "3400-5899",
        "v2": "6700-9199",
    }
    assert "shadow" not in written["routes"]["r"]
    reopened = RouteStore.open(path, 10)
    assert reopened.get("r").table == changed.table and reopened.get("r").route == changed.route
    assert [p.name for p in path.parent.iterdir()] == ["routes.yaml"]  # no temporary files left behind


def test_hand_written_files_without_buckets_get_contiguous_ranges(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n"
        "  r:\n"
        "    variants:\n"
        "      - {name: a, adapter: x, weight: 25}\n"
        "      - {name: b, adapter: base, weight: 75}\n"
    )
    table = RouteStore.open(path, 10).get("r").table
    assert table[:2500] == (0,) * 2500 and Counter(table) == {0: 2500, 1: 7500}


def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "routes.yaml"
    store = RouteStore.open(path, 10)
    store.set(route_from_spec("r", spec(50, 50)))
    before = path.read_text()

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(RoutesFileError, match="No space left on device; nothing was changed"):
        store.set(route_from_spec("r", spec(90, 10)))
    with pytest.raises(RoutesFileError):
        store.delete("r")
    assert path.read_text() == before
    assert store.get("r").route.variants[0].weight == 50
    assert [p.name for p in tmp_path.iterdir()] == ["routes.yaml"]


def test_the_file_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes: {}\n")
    path.chmod(0o640)
    RouteStore.open(path, 10).set(route_from_spec("r", spec(100)))
    assert path.stat().st_mode & 0o777 == 0o640


def test_limits_and_unknown_routes(tmp_path: Path) -> None:
    store = RouteStore(None, max_routes=1)
    store.set(route_from_spec("a", spec(100)))
    with pytest.raises(InvalidRoute, match=r"routing\.max_routes=1"):
        store.set(route_from_spec("b", spec(100)))
    store.set(route_from_spec("a", spec(50, 50)))  # replacing is not adding
    with pytest.raises(UnknownRoute, match="unknown route 'b'"):
        store.get("b")
    with pytest.raises(UnknownRoute, match="nothing to delete"):
        store.delete("b")
    store.delete("a")
    assert "a" not in store


def test_readers_never_see_half_a_route_while_writers_swap(tmp_path: Path) -> None:
    store = RouteStore(tmp_path / "routes.yaml", 10)
    store.set(route_from_spec("r", spec(50, 50)))
    weights = [(90, 10), (10, 90), (50, 25, 25), (100,)]
    stop = threading.Event()
    problems: list[str] = []

    def read() -> None:
        while not stop.is_set():
            compiled = store.get("r")
            counts = Counter(compiled.table)
            expected = {i: v.buckets for i, v in enumerate(compiled.route.variants) if v.buckets}
            if counts != expected:
                problems.append(f"{counts} != {expected}")

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    for round_ in range(40):
        store.set(route_from_spec("r", spec(*weights[round_ % len(weights)])))
    stop.set()
    for thread in readers:
        thread.join()
    assert problems == []
