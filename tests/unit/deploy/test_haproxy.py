"""deploy/haproxy: the bounded-load affinity template, rendered as the scale-out test and the benchmark render it,
passes ``haproxy -c`` (warnings fatal) in both balances, and says what the server and client expect: the header the
client sends, the JSON ``model`` of the HTTP API, the readiness route, one ring of the same replicas per protocol."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.client.affinity import AFFINITY_HEADER
from tests.support.deploy.files import REPO
from tests.support.deploy.haproxy import Balance, check, render

UPSTREAMS = [("10.0.0.11:50051", "10.0.0.11:8000"), ("10.0.0.12:50051", "10.0.0.12:8000")]
Sections = dict[str, list[str]]  # "backend loraplex_grpc" -> its directives, comments dropped


def sections(config: str) -> Sections:
    found: Sections = {}
    current: list[str] = []
    for raw in config.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if not raw[0].isspace():
            current = found.setdefault(line.strip(), [])
        else:
            current.append(line.strip())
    return found


@pytest.fixture(scope="module")
def shipped() -> Sections:
    return sections(render(":50051", ":8000", UPSTREAMS, Balance.AFFINITY, Path("/run/haproxy")))


@pytest.mark.parametrize("balance", list(Balance))
def test_the_rendered_template_passes_haproxy_check(balance: Balance, tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(render("127.0.0.1:50051", "127.0.0.1:8000", UPSTREAMS, balance, tmp_path))
    checked = check(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_both_backends_hash_the_affinity_key_consistently_with_a_load_bound(shipped: Sections) -> None:
    grpc, http = shipped["backend loraplex_grpc"], shipped["backend loraplex_http"]
    assert f"balance hdr({AFFINITY_HEADER})" in grpc
    assert "balance hash var(txn.affinity)" in http
    frontend = shipped["frontend loraplex_http"]
    assert f"http-request set-var(txn.affinity) req.hdr({AFFINITY_HEADER})" in frontend
    assert any("req.body,json_query('$.model')" in line for line in frontend)  # the OpenAI request's model
    assert "option http-buffer-request" in frontend
    for backend in (grpc, http):
        assert "hash-type consistent" in backend
        (factor,) = [int(line.split()[1]) for line in backend if line.startswith("hash-balance-factor")]
        assert 100 < factor <= 200  # bounded (0 would switch the bound off)


def servers(backend: list[str]) -> list[tuple[str, str]]:
    """(name, id) of each server line."""
    found = []
    for line in backend:
        if line.startswith("server "):
            words = line.split()
            found.append((words[1], words[words.index("id") + 1]))
    return found


def test_the_backends_list_the_same_replicas_with_the_same_ids_and_check_readiness(shipped: Sections) -> None:
    grpc, http = shipped["backend loraplex_grpc"], shipped["backend loraplex_http"]
    assert servers(grpc) == servers(http) == [("r0", "1"), ("r1", "2")]  # one ring: gRPC and HTTP calls meet
    assert "server r0 10.0.0.11:50051 id 1 check port 8000" in grpc  # the gRPC port, checked on the HTTP port
    assert "server r0 10.0.0.11:8000 id 1 check" in http
    for backend in (grpc, http):
        assert "http-check send meth GET uri /ready" in backend and "http-check expect status 200" in backend
    assert '@app.get("/ready")' in (REPO / "server" / "api" / "http" / "app.py").read_text()
    assert "default-server proto h2" in grpc and "http-check connect proto h1" in grpc  # h2c calls, HTTP/1.1 check
    assert any(line.endswith("proto h2") for line in shipped["frontend loraplex_grpc"])


def test_round_robin_keeps_everything_but_the_hashing(shipped: Sections) -> None:
    plain = sections(render(":50051", ":8000", UPSTREAMS, Balance.ROUND_ROBIN, Path("/run/haproxy")))
    for backend in ("backend loraplex_grpc", "backend loraplex_http"):
        assert "balance roundrobin" in plain[backend]
        assert not [line for line in plain[backend] if line.startswith(("hash-", "balance hash", "balance hdr"))]
        kept = [line for line in shipped[backend] if not line.startswith(("hash-", "balance"))]
        assert [line for line in plain[backend] if line != "balance roundrobin"] == kept
