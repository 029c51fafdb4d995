"""``loraplex-server``: wires settings, base model, engine and the gRPC API together; owns start-up and shutdown.

Start-up: the gRPC server listens first (health NOT_SERVING, calls get UNAVAILABLE), then the base model loads and
the engine starts on a worker thread, then health goes SERVING. SIGTERM or SIGINT: health goes NOT_SERVING, new
calls get UNAVAILABLE, accepted requests finish within ``server.grace_period_s``, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from loraplex.server.api.auth import AuthConfigError, TokenTable
from loraplex.server.api.server import build_server
from loraplex.server.config import Settings, settings_from_argv
from loraplex.server.engine.engine import Engine, describe
from loraplex.server.model.loader import load_base

log = logging.getLogger("loraplex.server")
_STOP_GRACE_S = 1.0  # after the drain: time for the last messages of finished requests to go out


def start_engine(settings: Settings) -> Engine:
    base = load_base(settings.model)
    engine = Engine(base, settings)
    engine.start()
    log.info("engine started: %s", describe(engine))
    return engine


async def serve(settings: Settings) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit status."""
    try:
        tokens = TokenTable.load(settings.auth.tokens_file) if settings.auth.tokens_file else None
        api = build_server(settings, tokens)
    except (AuthConfigError, ValueError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    await api.state.mark_starting()
    await api.server.start()
    log.info(
        "listening on %s:%d (%s, auth %s)",
        settings.server.host,
        api.port,
        "TLS" if api.tls else "plaintext",
        f"on, {len(tokens)} tokens" if tokens else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        engine = await asyncio.to_thread(start_engine, settings)
    except Exception:
        log.exception("the engine failed to start")
        await api.server.stop(grace=None)
        return 1
    if not stop.is_set():
        await api.state.serve(engine)
        log.info("serving")
        await stop.wait()
    grace = settings.server.grace_period_s
    log.info("draining: finishing accepted requests (grace period %.1f s)", grace)
    await api.state.drain()
    if not await api.state.wait_idle(grace):
        log.warning("%d requests still running after the grace period; cancelling them", api.state.active_streams)
    await api.server.stop(grace=_STOP_GRACE_S)
    await asyncio.to_thread(engine.stop)
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_argv(argv)
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
