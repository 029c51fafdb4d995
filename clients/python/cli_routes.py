"""The A/B commands of the ``loraplex`` CLI: ``routes list|set|delete``, ``ab report ROUTE`` and ``feedback``.

    loraplex routes set support-bot --variant v1=ticket-triage-v1:50 --variant v2=ticket-triage-v2:50 \\
        --shadow base:10
    loraplex feedback 5f0c… --good --score 4
    loraplex ab report support-bot
"""

from __future__ import annotations

import argparse
from typing import Any

from loraplex.client import render, route_render
from loraplex.client.sync import Client
from loraplex.client.types import Route, Shadow, Variant


def _variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    adapter, _, weight = rest.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if not name or not adapter or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ADAPTER:WEIGHT (e.g. v1=support-v1:50)")
    return Variant(name, adapter, value)


def _shadow(text: str) -> Shadow:
    adapter, _, percent = text.rpartition(":")
    try:
        value = float(percent)
    except ValueError:
        value = -1.0
    if not adapter or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADAPTER:PERCENT (e.g. support-v3:10)")
    return Shadow(adapter, value)


def add_commands(commands: Any, output: argparse.ArgumentParser) -> None:
    """Adds the routes, ab and feedback commands to the CLI's sub-parsers (``output`` gives them --json)."""
    routes = commands.add_parser("routes", help="list, set or delete A/B routes").add_subparsers(
        dest="action", required=True
    )
    routes.add_parser("list", parents=[output], help="the routes you may use")
    set_route = routes.add_parser("set", parents=[output], help="add or replace a route (admin)")
    set_route.add_argument("name")
    set_route.add_argument(
        "--variant", type=_variant, action="append", required=True, help="NAME=ADAPTER:WEIGHT (repeat; 'base' ok)"
    )
    set_route.add_argument("--control", default="", help="the control variant (default: the first)")
    set_route.add_argument("--salt", default="", help="bucketing salt (default: the route name)")
    set_route.add_argument("--shadow", type=_shadow, help="ADAPTER:PERCENT of requests mirrored, answers discarded")
    delete = routes.add_parser("delete", parents=[output], help="delete a route (admin)")
    delete.add_argument("name")

    ab = commands.add_parser("ab", help="A/B experiment reports").add_subparsers(dest="action", required=True)
    report = ab.add_parser("report", parents=[output], help="per-variant statistics and tests against the control")
    report.add_argument("route")

    feedback = commands.add_parser("feedback", parents=[output], help="report the outcome of a routed request")
    feedback.add_argument("request_id")
    label = feedback.add_mutually_exclusive_group()
    label.add_argument("--good", dest="good", action="store_true", default=None, help="a positive outcome")
    label.add_argument("--bad", dest="good", action="store_false", help="a negative outcome")
    feedback.add_argument("--score", type=float, help="a numeric outcome (e.g. a rating)")


def run(client: Client, args: argparse.Namespace) -> None:
    """Runs a routes, ab or feedback command."""
    if args.command == "ab":
        report = client.route_report(args.route)
        print(render.to_json(report) if args.json else route_render.report_text(report))
    elif args.command == "feedback":
        result = client.feedback(args.request_id, args.good, args.score)
        print(render.to_json(result) if args.json else f"counted for route {result.route}, variant {result.variant}")
    elif args.action == "list":
        found = client.list_routes()
        print(render.to_json(found) if args.json else route_render.routes_table(found))
    elif args.action == "set":
        route = client.set_route(Route(args.name, tuple(args.variant), args.control, args.salt, args.shadow))
        print(render.to_json(route) if args.json else route_render.routes_table([route]))
    else:
        client.delete_route(args.name)
        print('{"deleted": true}' if args.json else f"deleted route {args.name}")
