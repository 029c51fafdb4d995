"""A real HAProxy (Debian's package) in front of loraplex replicas on loopback, configured from the shipped template
deploy/haproxy/loraplex-affinity.cfg.template: bounded-load consistent hashing on the affinity key (gRPC and HTTP),
or, for comparison, the same file with each ``balance`` line set to round robin and the hashing lines left out."""

from __future__ import annotations

import csv
import io
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from tests.support.deploy.files import DEPLOY, require_tool
from tests.support.server_process import ServerProcess

TEMPLATE = DEPLOY / "haproxy" / "loraplex-affinity.cfg.template"
BALANCE_LINES = ("balance hdr(x-loraplex-affinity)", "balance hash var(txn.affinity)")
SHIPPED_FACTOR = 150
HASH_LINES = ("hash-type consistent", f"hash-balance-factor {SHIPPED_FACTOR}")
START_TIMEOUT_S = 20.0
# One line per request (the template's log-format): frontend, backend/server, ..., the caller's x-request-id.
LOG_LINE = re.compile(r"^\S+ (?P<backend>\S+)/(?P<server>\S+) status=(?P<status>-?\d+) .* request_id=(?P<id>\S+) ")
Upstream = tuple[str, str]  # a replica's gRPC and HTTP host:port


class Balance(StrEnum):
    AFFINITY = "haproxy-bounded-affinity"  # the template as shipped
    ROUND_ROBIN = "haproxy-round-robin"  # balance roundrobin


def _round_robin(line: str) -> str | None:
    stripped = line.strip()
    if stripped in BALANCE_LINES:
        return "    balance roundrobin"
    return None if stripped in HASH_LINES else line


def upstreams(replicas: Sequence[ServerProcess]) -> list[Upstream]:
    return [(replica.target, f"127.0.0.1:{replica.http_port}") for replica in replicas]


def render(
    grpc_listen: str,
    http_listen: str,
    replicas: Sequence[Upstream],
    balance: Balance,
    run_dir: Path,
    balance_factor: int = SHIPPED_FACTOR,
) -> str:
    """The template with its placeholders filled: replica ``i`` is server ``r<i>``, id ``i + 1``, in both backends;
    the gRPC backend's health check asks the replica's HTTP port. ``balance_factor`` replaces the shipped
    ``hash-balance-factor`` (the benchmark tries others)."""
    text = TEMPLATE.read_text()
    for line in (*BALANCE_LINES, *HASH_LINES):
        assert line in text, f"{TEMPLATE} no longer has '{line}'"
    grpc_lines = [
        f"    server r{i} {target} id {i + 1} check port {http.rpartition(':')[2]}"
        for i, (target, http) in enumerate(replicas)
    ]
    http_lines = [f"    server r{i} {http} id {i + 1} check" for i, (_, http) in enumerate(replicas)]
    lines: list[str] = []
    for line in text.splitlines():
        if line.strip() == "@GRPC_SERVERS@":
            lines += grpc_lines
        elif line.strip() == "@HTTP_SERVERS@":
            lines += http_lines
        elif balance is Balance.AFFINITY:
            lines.append(line.replace(HASH_LINES[1], f"hash-balance-factor {balance_factor}"))
        elif (kept := _round_robin(line)) is not None:
            lines.append(kept)
    text = "\n".join(lines).replace("@GRPC_LISTEN@", grpc_listen).replace("@HTTP_LISTEN@", http_listen)
    return text.replace("@RUN_DIR@", str(run_dir)) + "\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def check(config: Path) -> subprocess.CompletedProcess[str]:
    """``haproxy -c`` of ``config``, warnings fatal (``-dW``)."""
    haproxy = require_tool("haproxy", "haproxy")
    return subprocess.run([haproxy, "-dW", "-c", "-f", str(config)], capture_output=True, text=True, check=False)


class HaproxyProcess:
    def __init__(self, process: subprocess.Popen[bytes], run_dir: Path, port: int, http_port: int) -> None:
        self.process = process
        self.run_dir = run_dir
        self.port = port
        self.http_port = http_port

    @classmethod
    def start(
        cls,
        run_dir: Path,
        replicas: Sequence[ServerProcess],
        balance: Balance = Balance.AFFINITY,
        balance_factor: int = SHIPPED_FACTOR,
    ) -> HaproxyProcess:
        """Checks the rendered config with ``haproxy -c``, starts HAProxy in the foreground, waits for its ports."""
        haproxy = require_tool("haproxy", "haproxy")
        run_dir.mkdir(parents=True, exist_ok=True)
        port, http_port = free_port(), free_port()
        config = run_dir / "haproxy.cfg"
        listen = f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
        config.write_text(render(*listen, upstreams(replicas), balance, run_dir, balance_factor))
        checked = check(config)
        assert checked.returncode == 0, f"haproxy -c rejects the rendered template:\n{checked.stdout}{checked.stderr}"
        with (run_dir / "haproxy.out").open("wb") as out:
            process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        proxy = cls(process, run_dir, port, http_port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_accepts(port) and _accepts(http_port)):
            if process.poll() is not None or time.monotonic() > deadline:
                proxy.kill()
                raise RuntimeError(f"haproxy did not start on ports {port}, {http_port}:\n{proxy.log()}")
            time.sleep(0.05)
        return proxy

    @property
    def target(self) -> str:
        """Where gRPC clients call."""
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL through the proxy."""
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        path = self.run_dir / "haproxy.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def servers_by_request_id(self) -> dict[str, str]:
        """From HAProxy's request log: x-request-id -> the server (r0, r1, ...) that HAProxy finally sent the
        request to (after any redispatch), for the requests that carried the header and have finished."""
        found: dict[str, str] = {}
        for line in (self.run_dir / "haproxy.out").read_text(errors="replace").splitlines():
            if (match := LOG_LINE.match(line)) and match["id"] != "-":
                found[match["id"]] = match["server"]
        return found

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat`` on the stats socket: (backend, server) -> its counters (eresp, srv_abrt, hrsp_5xx, ...)."""
        with socket.socket(socket.AF_UNIX) as stats:
            stats.connect(str(self.run_dir / "haproxy.sock"))
            stats.sendall(b"show stat\n")
            chunks = []
            while chunk := stats.recv(65536):
                chunks.append(chunk)
        rows = csv.DictReader(io.StringIO(b"".join(chunks).decode().lstrip("# ")))
        return {(row["pxname"], row["svname"]): row for row in rows}

    def kill(self) -> None:
        """Hard stop (SIGTERM), then SIGKILL if HAProxy lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> HaproxyProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.kill()
