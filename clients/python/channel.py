"""How the client reaches the server: target, TLS (and mutual TLS) and the bearer token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_MAX_MESSAGE_BYTES = 64 << 20  # what the client accepts; the server's own limit applies first


@dataclass(frozen=True)
class Connection:
    target: str = DEFAULT_TARGET
    token: str | None = None  # sent as "authorization: Bearer <token>"
    tls: bool = False  # implied by any of the files below
    ca_cert: Path | None = None  # PEM bundle that verifies the server (default: the system's roots)
    client_cert: Path | None = None  # mutual TLS: this client's PEM certificate chain ...
    client_key: Path | None = None  # ... and its private key

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(f is not None for f in (self.ca_cert, self.client_cert, self.client_key))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: set both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
            private_key=self.client_key.read_bytes() if self.client_key else None,
            certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
        )

    def options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]

    def channel(self) -> grpc.Channel:
        if self.uses_tls:
            return grpc.secure_channel(self.target, self.credentials(), options=self.options())
        return grpc.insecure_channel(self.target, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.uses_tls:
            return grpc.aio.secure_channel(self.target, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(self.target, options=self.options())
