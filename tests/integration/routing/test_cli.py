"""The A/B commands of the ``loraplex`` CLI against the real server: routes set/list/delete, feedback and
``ab report``, with tables for people, JSON for scripts, and errors that say what to fix."""

from __future__ import annotations

import json
import subprocess

from tests.integration.api.test_cli import cli
from tests.integration.routing.conftest import ADMIN, TEAM_A
from tests.support.server_process import ServerProcess

ROUTE = "team-a-cli"


def as_admin(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(server, "--token", ADMIN, *args)


def test_routes_set_list_and_delete(routing_server: ServerProcess) -> None:
    done = as_admin(
        routing_server,
        "routes",
        "set",
        ROUTE,
        "--variant",
        "v1=ab-v1:70",
        "--variant",
        "v2=base:30",
        "--shadow",
        "ab-extra:5",
    )
    assert done.returncode == 0, done.stderr
    assert "v1=ab-v1:70%, v2=base:30%" in done.stdout and "ab-extra:5%" in done.stdout
    listed = json.loads(as_admin(routing_server, "routes", "list", "--json").stdout)
    mine = next(r for r in listed if r["name"] == ROUTE)
    assert mine["variants"] == [
        {"name": "v1", "adapter": "ab-v1", "weight": 70.0},
        {"name": "v2", "adapter": "base", "weight": 30.0},
    ]
    assert mine["shadow"] == {"adapter": "ab-extra", "percent": 5.0} and mine["control"] == "v1"
    deleted = as_admin(routing_server, "routes", "delete", ROUTE)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted route {ROUTE}"
    assert ROUTE not in as_admin(routing_server, "routes", "list").stdout


def test_bad_route_commands_say_what_to_fix(routing_server: ServerProcess) -> None:
    done = as_admin(routing_server, "routes", "set", ROUTE, "--variant", "v1=ab-v1")
    assert done.returncode == 2 and "is not NAME=ADAPTER:WEIGHT" in done.stderr
    done = as_admin(routing_server, "routes", "set", ROUTE, "--variant", "v1=ab-v1:60", "--variant", "v2=ab-v2:30")
    assert done.returncode == 1 and "error: INVALID_ARGUMENT: route 'team-a-cli': variant weights" in done.stderr
    done = cli(routing_server, "--token", TEAM_A, "routes", "set", ROUTE, "--variant", "v1=ab-v1:100")
    assert done.returncode == 1 and "PERMISSION_DENIED" in done.stderr
    done = cli(routing_server, "--token", TEAM_A, "feedback", "not-a-request", "--good")
    assert done.returncode == 1 and "NOT_FOUND: no routed request 'not-a-request'" in done.stderr


def test_feedback_then_ab_report(routing_server: ServerProcess) -> None:
    assert (
        as_admin(
            routing_server, "routes", "set", ROUTE, "--variant", "a=ab-v1:50", "--variant", "b=ab-v2:50"
        ).returncode
        == 0
    )
    for index in range(8):
        generated = cli(
            routing_server,
            "--token",
            TEAM_A,
            "generate",
            "Classify: refund request",
            "--route",
            ROUTE,
            "--user-key",
            f"cli-{index}",
            "--json",
        )
        result = json.loads(generated.stdout)
        variant = result["served_by"]["variant"]
        assert result["served_by"]["route"] == ROUTE and variant in ("a", "b")
        label = "--good" if index % 2 else "--bad"
        done = cli(routing_server, "--token", TEAM_A, "feedback", result["request_id"], label, "--score", str(index))
        assert done.stdout.strip() == f"counted for route {ROUTE}, variant {variant}", done.stderr
    report = cli(routing_server, "--token", TEAM_A, "ab", "report", ROUTE)
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0].startswith(f"route {ROUTE} · control a (*)")
    assert lines[1].split()[:4] == ["VARIANT", "ADAPTER", "WEIGHT", "REQUESTS"]
    assert lines[2].startswith("a *") and lines[3].startswith("b ") and "(control)" in lines[2]
    assert lines[-1].startswith("sample ratio: chi²=")
    data = json.loads(cli(routing_server, "--token", TEAM_A, "ab", "report", ROUTE, "--json").stdout)
    variants = {v["name"]: v for v in data["variants"]}
    assert sum(v["requests"] for v in variants.values()) == 8
    assert sum(v["labelled"] for v in variants.values()) == 8 and sum(v["positives"] for v in variants.values()) == 4
    assert sum(v["scored"] for v in variants.values()) == 8
    as_admin(routing_server, "routes", "delete", ROUTE)
