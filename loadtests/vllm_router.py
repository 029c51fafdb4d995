"""vLLM's router (the ``vllm-router`` package on PyPI, a Rust binary) in front of loraplex replicas' OpenAI HTTP API
on loopback, for the affinity benchmark. Not a project dependency (a 24 MB wheel with its own aiohttp/fastapi
stack): install it anywhere, e.g. ``python3 -m venv /tmp/vr && /tmp/vr/bin/pip install vllm-router``, and pass
the binary's path.

Its ``consistent_hash`` policy keys on the ``x-session-id`` header (0.1.17; the body's ``user`` is not read, the
prompt text is the fallback key): the benchmark sends the adapter id there. The health check asks each replica's
``/ready``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.deploy.haproxy import free_port
from tests.support.server_process import ServerProcess

SESSION_HEADER = "x-session-id"
START_TIMEOUT_S = 60.0


class VllmRouter:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, port: int) -> None:
        self.process = process
        self.log = log
        self.port = port

    @classmethod
    def start(cls, binary: str, run_dir: Path, replicas: Sequence[ServerProcess], policy: str) -> VllmRouter:
        """``binary --policy <policy>`` over the replicas' HTTP ports; returns once its ``/health`` answers."""
        found = shutil.which(binary)
        if found is None:
            raise FileNotFoundError(f"no vllm-router binary at '{binary}' (pip install vllm-router, pass its path)")
        run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        command = [found, "--host", "127.0.0.1", "--port", str(port), "--policy", policy, "--log-level", "warning"]
        command += ["--health-check-endpoint", "/ready", "--worker-urls", *(r.http_url for r in replicas)]
        log = run_dir / "vllm-router.out"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        router = cls(process, log, port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{router.url}/health", timeout=2):
                    return router
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    router.stop()
                    raise RuntimeError(
                        f"vllm-router did not start:\n{log.read_text(errors='replace')[-3000:]}"
                    ) from error
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> VllmRouter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
