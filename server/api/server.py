"""Assembles the ``grpc.aio`` server: servicers, health, reflection, interceptors, message limits and TLS."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from loraplex.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from loraplex.proto.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)
from loraplex.server.api.adapters import AdaptersServicer
from loraplex.server.api.auth import TokenTable
from loraplex.server.api.generation import GenerationServicer
from loraplex.server.api.inference import InferenceServicer
from loraplex.server.api.interceptors import AuthInterceptor, ErrorInterceptor, WriteTimeoutInterceptor
from loraplex.server.api.routing import RoutingServicer
from loraplex.server.api.state import ServingState
from loraplex.server.api.status import ServerServicer
from loraplex.server.config import ServerSettings, Settings
from loraplex.server.observability.telemetry import Telemetry
from loraplex.server.routing.router import Router

SERVICES = (
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
    routing_pb2.DESCRIPTOR.services_by_name["Routing"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["Server"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


@dataclass
class ApiServer:
    server: grpc.aio.Server
    state: ServingState
    port: int  # the bound port (server.port, or the one picked for port 0)
    tls: bool


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(server: ServerSettings) -> grpc.ServerCredentials | None:
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    try:
        pair = (server.tls_key_file.read_bytes(), server.tls_cert_file.read_bytes())
        client_ca = server.tls_client_ca_file.read_bytes() if server.tls_client_ca_file else None
    except OSError as exc:
        raise ValueError(f"cannot read a TLS file: {exc}") from exc
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=server.tls_require_client_cert
    )


def build_server(settings: Settings, tokens: TokenTable | None, router: Router, telemetry: Telemetry) -> ApiServer:
    """Creates (does not start) the server with every service bound; health says NOT_SERVING until it serves."""
    limit = settings.server.max_message_bytes
    server = grpc.aio.server(
        interceptors=[
            WriteTimeoutInterceptor(settings.server.stream_write_timeout_s),
            ErrorInterceptor(),
            AuthInterceptor(tokens),
        ],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    health = health_aio.HealthServicer()
    state = ServingState(settings, health, SERVICES, router, telemetry)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(state), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(state), server)
    routing_pb2_grpc.add_RoutingServicer_to_server(RoutingServicer(state), server)
    server_pb2_grpc.add_ServerServicer_to_server(ServerServicer(state), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*SERVICES, health_name, reflection.SERVICE_NAME), server)
    address = _address(settings.server.host, settings.server.port)
    credentials = _credentials(settings.server)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    return ApiServer(server=server, state=state, port=port, tls=credentials is not None)
