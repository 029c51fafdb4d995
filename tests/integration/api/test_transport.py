"""Mutual TLS from config, the limit on concurrent streams and the message size limit, on a server of their own."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from loraplex.client import Client, ResourceExhaustedError, UnavailableError
from loraplex.client.retry import NO_RETRIES
from tests.integration.api.helpers import ADAPTERS, PROMPT
from tests.support.server_process import ServerProcess
from tests.support.tls import Certificates, make_certificates

MAX_MESSAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, adapter_root: Path, certificates: Certificates
) -> Iterator[ServerProcess]:
    flags = (
        f"--server.tls-cert-file={certificates.server_cert}",
        f"--server.tls-key-file={certificates.server_key}",
        f"--server.tls-client-ca-file={certificates.ca}",
        "--server.tls-require-client-cert=true",
        "--server.max-concurrent-streams=2",
        f"--server.max-message-bytes={MAX_MESSAGE_BYTES}",
    )
    log = tmp_path_factory.mktemp("tls") / "server.log"
    with ServerProcess.start(log, [adapter_root], *flags) as process:
        yield process
        assert process.stop() == 0


@pytest.fixture(scope="module")
def client(tls_server: ServerProcess, certificates: Certificates) -> Iterator[Client]:
    with Client(
        tls_server.target,
        ca_cert=certificates.ca,
        client_cert=certificates.client_cert,
        client_key=certificates.client_key,
        retry=NO_RETRIES,
    ) as opened:
        yield opened


def test_mutual_tls_serves_clients_with_a_certificate(client: Client, tls_server: ServerProcess) -> None:
    assert client.generate(PROMPT, adapter=ADAPTERS[0], max_new_tokens=3, ignore_eos=True).usage.completion_tokens == 3
    assert "TLS" in tls_server.log()


@pytest.mark.parametrize("missing", ["client certificate", "trust in the server", "TLS"])
def test_clients_without_what_mutual_tls_needs_cannot_connect(
    tls_server: ServerProcess, certificates: Certificates, missing: str
) -> None:
    options = {
        "client certificate": {"ca_cert": certificates.ca},
        "trust in the server": {
            "ca_cert": certificates.stranger_ca,
            "client_cert": certificates.client_cert,
            "client_key": certificates.client_key,
        },
        "TLS": {},
    }[missing]
    refused = Client(tls_server.target, retry=NO_RETRIES, timeout=10, **options)  # type: ignore[arg-type]
    with refused, pytest.raises(UnavailableError):
        refused.generate(PROMPT, max_new_tokens=1)


def test_streams_beyond_the_limit_are_refused_at_once(client: Client) -> None:
    streams = [client.stream(PROMPT, max_new_tokens=60, ignore_eos=True) for _ in range(2)]
    for stream in streams:
        next(stream)
    started = time.monotonic()
    with pytest.raises(ResourceExhaustedError) as raised:
        client.generate(PROMPT, max_new_tokens=1)
    assert time.monotonic() - started < 1.0
    assert "server.max_concurrent_streams=2" in raised.value.message
    assert client.tokenize("not a generation").count > 0  # other calls are not limited
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 30
    while client.status().active_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.generate(PROMPT, max_new_tokens=1).usage.completion_tokens == 1


def test_messages_over_the_size_limit_are_refused(client: Client) -> None:
    with pytest.raises(ResourceExhaustedError) as raised:
        client.generate("x" * (MAX_MESSAGE_BYTES + 1))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in raised.value.message


def test_the_http_api_speaks_https_only_with_the_grpc_ports_certificate(
    tls_server: ServerProcess, certificates: Certificates
) -> None:
    assert tls_server.http_url.startswith("https://")
    pair = (str(certificates.client_cert), str(certificates.client_key))
    with httpx.Client(verify=ssl.create_default_context(cafile=certificates.ca), cert=pair, timeout=30) as https:
        assert https.get(f"{tls_server.http_url}/health").json()["status"] == "ok"
        answer = https.post(
            f"{tls_server.http_url}/v1/completions",
            json={"model": ADAPTERS[0], "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True},
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the port: no HTTP answer
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/health", timeout=10)
    with pytest.raises(httpx.HTTPError):  # the gRPC port's mutual-TLS rule: no client certificate, no answer
        httpx.get(f"{tls_server.http_url}/health", verify=ssl.create_default_context(cafile=certificates.ca))
