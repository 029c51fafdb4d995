"""``loraplex``: the command line of a loraplex server (generate, chat, tokenize, adapters, routes, ab report,
feedback, status, health).

Human-readable output by default (generated text streams to the terminal); ``--json`` prints one JSON object per
result for scripts. The server address, token and TLS files come from flags or ``LORAPLEX_TARGET`` /
``LORAPLEX_TOKEN``. Exit status: 0 on success, 1 when the server refused or failed the call (or is not healthy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from loraplex.client import cli_routes, render
from loraplex.client.channel import DEFAULT_TARGET
from loraplex.client.errors import LoraplexError
from loraplex.client.sync import Client
from loraplex.client.types import ChatMessage, GenerateOptions, StreamChunk

HEALTH_SERVICES = (
    "",  # the server as a whole
    "loraplex.v1.Generation",
    "loraplex.v1.Adapters",
    "loraplex.v1.Server",
    "inference.GRPCInferenceService",
)
_SAMPLING_FLAGS: dict[str, type] = {
    "max_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "repetition_penalty": float,
}


def add_connection_flags(parser: argparse.ArgumentParser, *address_flags: str) -> None:
    """The flags that say how to reach a server (address, token, TLS, deadline); ``client_from_args`` reads them."""
    target = os.environ.get("LORAPLEX_TARGET", DEFAULT_TARGET)
    parser.add_argument(*address_flags, dest="target", default=target, help="host:port ($LORAPLEX_TARGET)")
    parser.add_argument("--token", default=os.environ.get("LORAPLEX_TOKEN"), help="bearer token ($LORAPLEX_TOKEN)")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--tls", action="store_true", help="use TLS (implied by the certificate flags)")
    parser.add_argument("--ca-cert", type=Path, help="PEM bundle that verifies the server")
    parser.add_argument("--client-cert", type=Path, help="mutual TLS: this client's PEM certificate")
    parser.add_argument("--client-key", type=Path, help="mutual TLS: this client's PEM private key")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each call in seconds")


def client_from_args(args: argparse.Namespace) -> Client:
    """A client for the server named by the flags of ``add_connection_flags``."""
    token = args.token_file.read_text().strip() if args.token_file else args.token
    options: dict[str, Any] = {"token": token, "tls": args.tls, "ca_cert": args.ca_cert}
    options |= {"client_cert": args.client_cert, "client_key": args.client_key}
    return Client(args.target, timeout=args.timeout, **{k: v for k, v in options.items() if v is not None})


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Talk to a loraplex server.")
    add_connection_flags(parser, "--target")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    output = argparse.ArgumentParser(add_help=False)  # --json also after the command
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text")
    commands = parser.add_subparsers(dest="command", required=True)

    generation = argparse.ArgumentParser(add_help=False, parents=[output])
    generation.add_argument("--adapter", help="adapter id (default: the base model)")
    generation.add_argument("--route", help="A/B route instead of an adapter")
    generation.add_argument("--user-key", help="sticky bucketing key for a route")
    for name, kind in _SAMPLING_FLAGS.items():
        generation.add_argument(f"--{name.replace('_', '-')}", type=kind)
    generation.add_argument("--stop", action="append", help="stop string (repeatable)")
    generation.add_argument("--no-stream", action="store_true", help="wait for the whole answer")

    generate = commands.add_parser("generate", parents=[generation], help="complete a prompt")
    generate.add_argument("prompt")
    chat = commands.add_parser("chat", parents=[generation], help="chat; without MESSAGE, one turn per stdin line")
    chat.add_argument("message", nargs="?")
    chat.add_argument("--system", help="system prompt")
    tokenize = commands.add_parser("tokenize", parents=[output], help="token ids of a prompt")
    tokenize.add_argument("prompt")

    adapters = commands.add_parser("adapters", help="list, show, load, unload or upload adapters").add_subparsers(
        dest="action", required=True
    )
    listing = adapters.add_parser("list", parents=[output], help="the adapters in memory and on the adapter roots")
    listing.add_argument("--limit", type=_positive, help="at most this many (default: the server's list limit)")
    upload = adapters.add_parser("upload", parents=[output], help="copy a local adapter directory onto the server")
    upload.add_argument("directory", type=Path, help="PEFT adapter directory (adapter_config.json + safetensors)")
    upload.add_argument("adapter_id", help="the id it is served under")
    upload.add_argument("--pin", action="store_true", default=None, help="keep it on the device")
    for action in ("show", "load", "unload"):
        sub = adapters.add_parser(action, parents=[output], help=f"{action} one adapter")
        sub.add_argument("adapter_id")
        if action == "load":
            pin = sub.add_mutually_exclusive_group()
            pin.add_argument("--pin", dest="pin", action="store_true", default=None, help="keep it on the device")
            pin.add_argument("--unpin", dest="pin", action="store_false", help="let it be evicted again")
    commands.add_parser("status", parents=[output], help="what the server holds and how busy it is")
    health = commands.add_parser("health", parents=[output], help="grpc.health.v1 status; exit 1 unless SERVING")
    health.add_argument("--service", help="one service (default: the server and each service)")
    cli_routes.add_commands(commands, output)
    return parser


def _options(args: argparse.Namespace) -> GenerateOptions:
    options: dict[str, Any] = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    options |= {"adapter": args.adapter, "route": args.route, "user_key": args.user_key, "stop": args.stop}
    return cast(GenerateOptions, {k: v for k, v in options.items() if v is not None})


def _print_stream(chunks: Iterator[StreamChunk]) -> str:
    """Writes the text as it arrives, then a summary line on stderr; returns the whole text."""
    text: list[str] = []
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        text.append(chunk.text)
        if chunk.is_last:
            print()
            print(render.summary(chunk), file=sys.stderr)
    return "".join(text)


def _generate(client: Client, args: argparse.Namespace) -> None:
    options = _options(args)
    if args.json or args.no_stream:
        result = client.generate(args.prompt, **options)
        print(render.to_json(result) if args.json else result.text)
    else:
        _print_stream(client.stream(args.prompt, **options))


def _chat_turn(client: Client, args: argparse.Namespace, history: list[ChatMessage]) -> str:
    options = _options(args)
    if args.json or args.no_stream:
        result = client.chat(history, **options)
        print(render.to_json(result) if args.json else result.text)
        return result.text
    return _print_stream(client.chat_stream(history, **options))


def _chat(client: Client, args: argparse.Namespace) -> None:
    history = [ChatMessage("system", args.system)] if args.system else []
    turns = [args.message] if args.message is not None else (line.rstrip("\n") for line in sys.stdin)
    for turn in turns:
        if not turn.strip():
            continue
        history.append(ChatMessage("user", turn))
        history.append(ChatMessage("assistant", _chat_turn(client, args, history)))


def _adapters(client: Client, args: argparse.Namespace) -> None:
    if args.action == "list":
        listing = client.list_adapters(limit=args.limit)
        print(render.to_json(list(listing)) if args.json else render.adapters_table(listing))
        if listing.truncated:
            print(render.truncation_note(listing), file=sys.stderr)
        return
    if args.action == "unload":
        client.unload_adapter(args.adapter_id)
        print('{"unloaded": true}' if args.json else f"unloaded {args.adapter_id}")
        return
    if args.action == "load":
        adapter = client.load_adapter(args.adapter_id, args.pin)
    elif args.action == "upload":
        adapter = client.upload_adapter(args.directory, args.adapter_id, args.pin)
    else:
        adapter = client.get_adapter(args.adapter_id)
    print(render.to_json(adapter) if args.json else render.adapter_details(adapter))


def _health(client: Client, args: argparse.Namespace) -> int:
    services = [args.service] if args.service is not None else list(HEALTH_SERVICES)
    statuses = {service: client.health(service) for service in services}
    if args.json:
        print(json.dumps(statuses))
    else:
        print(render.table(["SERVICE", "STATUS"], [[name or "(server)", status] for name, status in statuses.items()]))
    return 0 if all(status == "SERVING" for status in statuses.values()) else 1


def run(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        if args.command == "generate":
            _generate(client, args)
        elif args.command == "chat":
            _chat(client, args)
        elif args.command == "tokenize":
            tokens = client.tokenize(args.prompt)
            print(render.to_json(tokens) if args.json else f"{tokens.count} tokens: {list(tokens.token_ids)}")
        elif args.command == "adapters":
            _adapters(client, args)
        elif args.command in ("routes", "ab", "feedback"):
            cli_routes.run(client, args)
        elif args.command == "status":
            status = client.status()
            print(render.to_json(status) if args.json else render.status_details(status))
        else:
            return _health(client, args)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = run(args)
    except LoraplexError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
