"""The real ``loraplex-server`` as a child process on a free loopback port, for integration tests and benchmarks.

The server binds port 0 and logs ``listening on HOST:PORT`` (gRPC) and, before it, ``HTTP API (OpenAI-compatible)
on http://HOST:PORT``; its log goes to a file (never a pipe nobody reads).
``start`` returns once the log says ``serving`` (or, with ``wait="listening"``, as soon as the port is bound).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

_LISTENING = re.compile(r"listening on (\S+):(\d+) ")
_HTTP_LISTENING = re.compile(r"HTTP API \(OpenAI-compatible\) on (https?)://(\S+):(\d+)")
START_TIMEOUT_S = 180.0  # the base model loads in seconds, but a busy 2-core machine can take much longer


class ServerFailed(RuntimeError):
    """The server exited or did not reach the awaited state; the message ends with its log."""


class ServerProcess:
    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = 0
        self.http_port = 0  # 0 while the HTTP API is off (--http-port -1)
        self.http_scheme = "http"  # https when the server has TLS

    @classmethod
    def start(
        cls,
        log_path: Path,
        adapter_roots: Sequence[Path],
        *flags: str,
        wait: str = "serving",
        timeout: float = START_TIMEOUT_S,
        program: Sequence[str] = (sys.executable, "-m", "loraplex.server.main"),
    ) -> ServerProcess:
        """Starts ``program`` (this interpreter's ``loraplex.server.main``) with the adapter roots and ``flags``."""
        command = [*program, "--port", "0", "--metrics-port", "0", "--http-port", "0"]
        for root in adapter_roots:
            command += ["--adapter-root", str(root)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("wb") as log:
            process = subprocess.Popen([*command, *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
        server = cls(process, log_path)
        try:
            server.port = int(server.wait_for_log(_LISTENING, timeout).group(2))
            http = _HTTP_LISTENING.search(server.log())
            if http:
                server.http_scheme, server.http_port = http.group(1), int(http.group(3))
            if wait == "serving":
                server.wait_for_log(re.compile(r"loraplex\.server: serving"), timeout)
        except BaseException:
            server.kill()
            raise
        return server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (OpenAI clients take it with ``/v1`` appended)."""
        return f"{self.http_scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.search(self.log())
            if found:
                return found
            if self.process.poll() is not None:
                raise ServerFailed(f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise ServerFailed(f"no '{pattern.pattern}' in the server log after {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Sends ``signum`` and waits for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerFailed(f"the server did not exit within {timeout:.0f} s of signal {signum}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.kill()


@contextmanager
def stopping_cleanly(server: ServerProcess) -> Iterator[ServerProcess]:
    """``server`` for a fixture: killed however the block ends, and, when it ends normally, it must exit 0 on
    SIGTERM (the assertion shows the log's end otherwise)."""
    with server:
        yield server
        assert server.stop() == 0, server.log()[-3000:]
