"""``loraplex-server``: wires settings, base model, engine and the gRPC API together; owns start-up and shutdown.

Threads: the process's main thread does all the torch work (loads the base model, then runs the engine's step
loop, see :meth:`Engine.run` for why it must be the main thread); the asyncio event loop with the gRPC, HTTP and metrics
servers runs on the ``api`` thread. :class:`EngineHandoff` passes the engine and the stop request between them.

Start-up: the routes file is read and checked (every adapter it names must exist), the ``/metrics`` HTTP server,
the gRPC server and the OpenAI-compatible HTTP API listen (health NOT_SERVING, calls get UNAVAILABLE or 503), then
the base model loads and the engine starts, then health goes SERVING. SIGTERM or SIGINT: health goes NOT_SERVING,
new calls get UNAVAILABLE (503 over HTTP), accepted requests finish within ``server.grace_period_s``, the HTTP API
and the gRPC server stop, the engine stops, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

from prometheus_client import disable_created_metrics

import loraplex.server
from loraplex.server.api.auth import AuthConfigError, TokenTable
from loraplex.server.api.http.server import HttpServer, build_http_server
from loraplex.server.api.server import ApiServer, build_server
from loraplex.server.config import Settings, settings_from_argv
from loraplex.server.core.events import EngineListener
from loraplex.server.engine.engine import Engine, describe
from loraplex.server.lora.sources import AdapterDirectoryMissing, AdapterOutsideRoot, AdapterRoots, InvalidAdapterId
from loraplex.server.model.loader import load_base
from loraplex.server.observability.metrics import RouteGauges
from loraplex.server.observability.telemetry import Telemetry
from loraplex.server.routing.errors import InvalidRoute, RoutingError
from loraplex.server.routing.router import Router

log = logging.getLogger("loraplex.server")
_STOP_GRACE_S = 1.0  # after the drain: time for the last messages of finished requests to go out


class EngineHandoff:
    """What the main (torch) thread and the api (asyncio) thread tell each other during start-up and shutdown."""

    def __init__(self) -> None:
        self._listening = threading.Event()  # set when the API listens, or gave up (then ``api_failed``)
        self.api_failed = False
        self.listener: EngineListener | None = None
        self._engine: asyncio.Future[Engine | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self.started: Engine | None = None

    # api thread
    def listening(self, listener: EngineListener) -> asyncio.Event:
        """The API listens; returns the event set when a stop is requested. Call from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        self._engine = self._loop.create_future()
        self.listener = listener
        self._listening.set()
        return self._stop

    def give_up(self) -> None:
        self.api_failed = True
        self._listening.set()

    async def engine(self) -> Engine | None:
        """The started engine, or None when it failed to start."""
        assert self._engine is not None
        return await self._engine

    # main thread
    def wait_listening(self) -> bool:
        self._listening.wait()
        return not self.api_failed

    def engine_ready(self, engine: Engine | None) -> None:
        assert self._loop is not None and self._engine is not None
        self.started = engine
        future = self._engine

        def resolve() -> None:
            if not future.done():
                future.set_result(engine)

        self._loop.call_soon_threadsafe(resolve)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """The SIGTERM/SIGINT handler (signals are delivered to the main thread)."""
        del signum, frame
        self._stop_requested = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)


def start_engine(settings: Settings, listener: EngineListener) -> Engine:
    base = load_base(settings.model)
    engine = Engine(base, settings, listener=listener)
    engine.open()
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
    telemetry.attach_engine(
        engine.stats, engine.settings.engine.max_queue, manifest_of, build, adapters=engine.list_adapters
    )


async def serve(settings: Settings, handoff: EngineHandoff) -> int:
    """The api thread: runs the servers until a stop is requested; returns the exit status."""
    try:
        tokens = TokenTable.load(settings.auth.tokens_file) if settings.auth.tokens_file else None
        router = open_router(settings)
        telemetry = Telemetry(settings.observability)
        api = build_server(settings, tokens, router, telemetry)
        http = build_http_server(api.state, tokens, _STOP_GRACE_S)
        metrics_host = settings.server.metrics_host or settings.server.host
        metrics = telemetry.serve(metrics_host, settings.server.metrics_port)
    except (AuthConfigError, RoutingError, ValueError, RuntimeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        handoff.give_up()
        return 2
    telemetry.attach_routes(lambda: route_gauges(router))
    log.info("metrics on http://%s:%d/metrics", metrics_host, metrics.server_address[1])
    try:
        return await _serve(settings, api, http, tokens, telemetry, handoff)
    finally:
        metrics.shutdown()


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{scheme}://{host}:{port}"


async def _serve(
    settings: Settings,
    api: ApiServer,
    http: HttpServer | None,
    tokens: TokenTable | None,
    telemetry: Telemetry,
    handoff: EngineHandoff,
) -> int:
    await api.state.mark_starting()
    try:
        await api.server.start()
    except Exception:
        handoff.give_up()
        raise
    if http is not None:
        http.start()
        log.info("HTTP API (OpenAI-compatible) on %s", _url(settings.server.host, http.port, http.scheme))
    log.info(
        "listening on %s:%d (%s, auth %s)",
        settings.server.host,
        api.port,
        "TLS" if api.tls else "plaintext",
        f"on, {len(tokens)} tokens" if tokens else "off",
    )
    stop = handoff.listening(telemetry.listener)
    engine = await handoff.engine()
    if engine is None:
        if http is not None:
            await http.stop()
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
    if http is not None:
        await http.stop()
    await api.server.stop(grace=_STOP_GRACE_S)
    await asyncio.to_thread(engine.stop)
    log.info("stopped")
    return 0


def run_server(settings: Settings) -> int:
    """Runs the api thread, loads the engine and runs its step loop on this (the main) thread; the exit status."""
    handoff = EngineHandoff()
    status: list[int] = []

    def api_thread() -> None:
        try:
            status.append(asyncio.run(serve(settings, handoff)))
        except BaseException:
            log.exception("the API thread failed")
            status.append(1)
            handoff.give_up()
        finally:
            if handoff.started is not None:
                handoff.started.stop()  # the main thread's step loop returns (a no-op after a normal drain)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handoff.request_stop)
    api = threading.Thread(target=api_thread, name="api")
    api.start()
    if handoff.wait_listening():
        assert handoff.listener is not None
        try:
            engine: Engine | None = start_engine(settings, handoff.listener)
        except Exception:
            log.exception("the engine failed to start")
            engine = None
        handoff.engine_ready(engine)
        if engine is not None:
            engine.run()  # until the api thread, having drained, calls engine.stop()
    api.join()
    return status[0] if status else 1


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double every counter
    settings = settings_from_argv(argv)
    sys.exit(run_server(settings))


if __name__ == "__main__":
    main()
