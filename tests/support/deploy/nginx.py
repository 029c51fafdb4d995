"""A real nginx (Debian's package) in front of loraplex replicas on loopback, configured from the shipped template
deploy/nginx/loraplex-affinity.conf.template: consistent hashing on x-loraplex-affinity, or, for comparison,
the same file without the ``hash`` line (nginx's default round robin)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from tests.support.deploy.files import DEPLOY, require_tool

TEMPLATE = DEPLOY / "nginx" / "loraplex-affinity.conf.template"
_HASH_LINE = "hash $loraplex_affinity consistent;"
START_TIMEOUT_S = 20.0


class Balance(StrEnum):
    AFFINITY = "affinity"  # the template as shipped
    ROUND_ROBIN = "round-robin"  # the hash line removed


def render(listen: str, upstreams: Sequence[str], run_dir: Path, balance: Balance = Balance.AFFINITY) -> str:
    """The template with its placeholders filled; ``upstreams`` are host:port of the replicas."""
    text = TEMPLATE.read_text()
    assert _HASH_LINE in text, f"{TEMPLATE} no longer hashes on the affinity key"
    if balance is Balance.ROUND_ROBIN:
        text = "\n".join(line for line in text.splitlines() if line.strip() != _HASH_LINE) + "\n"
    servers = "\n".join(f"        server {target} max_fails=1 fail_timeout=10s;" for target in upstreams)
    lines = [servers if line.strip() == "@SERVERS@" else line for line in text.splitlines()]
    return "\n".join(lines).replace("@LISTEN@", listen).replace("@RUN_DIR@", str(run_dir)) + "\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class NginxProcess:
    def __init__(self, process: subprocess.Popen[bytes], run_dir: Path, port: int) -> None:
        self.process = process
        self.run_dir = run_dir
        self.port = port

    @classmethod
    def start(cls, run_dir: Path, upstreams: Sequence[str], balance: Balance = Balance.AFFINITY) -> NginxProcess:
        """Checks the rendered config with ``nginx -t``, starts nginx in the foreground and waits for its port."""
        nginx = require_tool("nginx", "nginx")
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir.chmod(0o777)  # run as root, nginx's workers are 'nobody' and write temporary files here
        port = free_port()
        config = run_dir / "nginx.conf"
        config.write_text(render(f"127.0.0.1:{port}", upstreams, run_dir, balance))
        command = [nginx, "-p", str(run_dir), "-c", str(config), "-e", str(run_dir / "error.log")]
        checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, f"nginx -t rejects the rendered template:\n{checked.stderr}"
        with (run_dir / "nginx.out").open("wb") as out:
            process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
        proxy = cls(process, run_dir, port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                proxy.kill()
                raise RuntimeError(f"nginx did not start on port {port}:\n{proxy.log()}")
            time.sleep(0.05)
        return proxy

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace")[-3000:]
            for path in (self.run_dir / "nginx.out", self.run_dir / "error.log")
            if path.exists()
        )

    def access_log(self) -> list[str]:
        return (self.run_dir / "access.log").read_text().splitlines()

    def kill(self) -> None:
        """Graceful stop (SIGQUIT), then SIGKILL if nginx lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> NginxProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.kill()
