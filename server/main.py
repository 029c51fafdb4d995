"""``loraplex-server``: wires settings, base model, engine and the gRPC API together; owns start-up and shutdown.

Start-up: the routes file is read and checked (every adapter it names must exist), the ``/metrics`` HTTP server and
the gRPC server listen (health NOT_SERVING, calls get UNAVAILABLE), then the base model loads and the engine starts
on a worker thread, then health goes SERVING. SIGTERM or SIGINT: health goes NOT_SERVING, new
calls get UNAVAILABLE, accepted requests finish within ``server.grace_period_s``, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import disable_created_metrics

import loraplex.server
from loraplex.server.api.auth import AuthConfigError, TokenTable
from loraplex.server.api.server import ApiServer, build_server
from loraplex.server.config import Settings, settings_from_argv
from loraplex.server.engine.engine import Engine, describe
from loraplex.server.engine.events import EngineListener
from loraplex.server.lora.sources import AdapterDirectoryMissing, AdapterOutsideRoot, AdapterRoots, InvalidAdapterId
from loraplex.server.model.loader import load_base
from loraplex.server.observability.metrics import RouteGauges
from loraplex.server.observability.telemetry import Telemetry
from loraplex.server.routing.errors import InvalidRoute, RoutingError
from loraplex.server.routing.router import Router

log = logging.getLogger("loraplex.server")
_STOP_GRACE_S = 1.0  # after the drain: time for the last messages of finished requests to go out


def start_engine(settings: Settings, listener: EngineListener) -> Engine:
    base = load_base(settings.model)
    engine = Engine(base, settings, listener=listener)
    engine.start()
    log.info("engine started: %s", describe(engine))
    return engine


def open_router(settings: Settings) -> Router:
    """The routes of ``routing.routes_file``, each of whose adapters exists under the adapter roots."""
    router = Router.from_settings(settings.routing)
    roots = AdapterRoots.of(settings.adapters.roots)
    for compiled in router.routes():
        for adapter_id in compiled.route.adapters:
            try:
                roots.resolve(adapter_id)
            except (AdapterDirectoryMissing, AdapterOutsideRoot, InvalidAdapterId) as exc:
                raise InvalidRoute(
                    f"routes file {settings.routing.routes_file}: route '{compiled.route.name}': {exc}; add the "
                    "adapter or fix the route"
                ) from None
    log.info("%d A/B routes (%s)", len(router.routes()), settings.routing.routes_file or "in memory only")
    return router


def route_gauges(router: Router) -> Iterator[RouteGauges]:
    for compiled, ratio in router.sample_ratios():
        weights = {v.name: v.weight for v in compiled.route.variants}
        yield RouteGauges(compiled.route.name, weights, None if ratio is None else ratio.p_value)


def attach_engine(telemetry: Telemetry, engine: Engine) -> None:
    def manifest_of(adapter_id: str) -> Mapping[str, Any] | None:
        version = engine.adapters.current_version(adapter_id)
        return None if version is None else version.manifest

    build = {
        "version": loraplex.server.__version__,
        "base_model": engine.base.name,
        "quantization": engine.base.quantization,
    }
    telemetry.attach_engine(engine.stats, engine.settings.engine.max_queue, manifest_of, build)


async def serve(settings: Settings) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit status."""
    try:
        tokens = TokenTable.load(settings.auth.tokens_file) if settings.auth.tokens_file else None
        router = open_router(settings)
        telemetry = Telemetry(settings.observability)
        api = build_server(settings, tokens, router, telemetry)
        metrics_host = settings.server.metrics_host or settings.server.host
        metrics = telemetry.serve(metrics_host, settings.server.metrics_port)
    except (AuthConfigError, RoutingError, ValueError, RuntimeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    telemetry.attach_routes(lambda: route_gauges(router))
    log.info("metrics on http://%s:%d/metrics", metrics_host, metrics.server_address[1])
    try:
        return await _serve(settings, api, tokens, telemetry)
    finally:
        metrics.shutdown()


async def _serve(settings: Settings, api: ApiServer, tokens: TokenTable | None, telemetry: Telemetry) -> int:
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
        engine = await asyncio.to_thread(start_engine, settings, telemetry.listener)
    except Exception:
        log.exception("the engine failed to start")
        await api.server.stop(grace=None)
        return 1
    attach_engine(telemetry, engine)
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
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double every counter
    settings = settings_from_argv(argv)
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
