"""The HTTP API's uvicorn server, run as a task in the gRPC server's event loop.

:func:`build_http_server` binds the socket at once (so the port, picked by the OS for ``server.http_port`` 0, is
known before start-up is announced, and a port in use fails start-up like the gRPC port does); :meth:`HttpServer.start`
serves it; :meth:`HttpServer.stop` runs after the drain: it stops accepting, lets responses still in flight finish
for ``grace`` seconds, then cancels them. With ``server.tls_cert_file`` set, it speaks HTTPS only, with the gRPC
port's certificate, key and client-certificate rules.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from loraplex.server.api.auth import TokenTable
from loraplex.server.api.http.app import create_app
from loraplex.server.api.http.protocol import with_write_timeout
from loraplex.server.api.state import ServingState
from loraplex.server.config import ServerSettings

log = logging.getLogger(__name__)
DISABLED = -1  # server.http_port that turns the HTTP API off


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, reuse_port=False)
    sock.setblocking(False)
    return sock


@dataclass
class HttpServer:
    server: uvicorn.Server
    sock: socket.socket
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    @property
    def scheme(self) -> str:
        return "https" if self.server.config.is_ssl else "http"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]), name="http-api")

    async def stop(self) -> None:
        """Stops the server (uvicorn's graceful shutdown, bounded by its ``timeout_graceful_shutdown``)."""
        task = self._task
        if task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        try:
            await task
        except Exception:
            log.exception("the HTTP API server failed")
        self.sock.close()


def _client_cert_rule(settings: ServerSettings) -> ssl.VerifyMode:
    if settings.tls_require_client_cert:
        return ssl.CERT_REQUIRED
    return ssl.CERT_OPTIONAL if settings.tls_client_ca_file else ssl.CERT_NONE


def _tls(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn's TLS options from the gRPC port's: the same certificate, key and client verification."""
    if settings.tls_cert_file is None:
        return {}
    client_ca = settings.tls_client_ca_file
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_ca_certs": str(client_ca) if client_ca else None,
        "ssl_cert_reqs": _client_cert_rule(settings),
    }


def build_http_server(state: ServingState, tokens: TokenTable | None, grace_s: float) -> HttpServer | None:
    """The HTTP API server, bound to ``server.host:server.http_port`` (not started); None when it is off."""
    settings = state.settings.server
    if settings.http_port == DISABLED:
        return None
    sock = bind(settings.host, settings.http_port)
    config = uvicorn.Config(
        create_app(state, tokens),
        log_config=None,  # keep the process's logging set-up
        access_log=False,
        lifespan="off",
        http=with_write_timeout(settings.stream_write_timeout_s),
        ws="none",
        timeout_graceful_shutdown=max(1, round(grace_s)),
        server_header=False,
        **_tls(settings),
    )
    return HttpServer(uvicorn.Server(config), sock)
