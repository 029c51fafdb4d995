"""End to end: the Locust load test (``loadtests/locustfile.py``) headless against a real server with synthetic
adapters, as ``make loadtest`` runs it. A ~25 s run with loose thresholds must pass, its CSV must show traffic from
every user type (stream TTFT and end-to-end over gRPC and over the OpenAI HTTP API, unary, A/B route, admin
load/replace/unload) with failures within the threshold; a short run with a threshold no server can meet must exit
non-zero and say which one was missed."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtests.entries import (
    ADMIN_LOAD,
    ADMIN_REPLACE,
    ADMIN_UNLOAD,
    E2E_SUFFIX,
    HTTP_STREAM,
    ROUTED,
    STREAM,
    TTFT_SUFFIX,
    UNARY,
)
from loadtests.run_loadtest import (
    CHURN_PREFIX,
    TRAFFIC_PREFIX,
    embedded_shape,
    ensure_adapters,
    locust_command,
    server_flags,
)
from loadtests.workload import adapter_ids
from tests.support.server_process import ServerProcess

TRAFFIC_ADAPTERS = 6
CHURN_ADAPTERS = 2
MAX_FAILURE_RATIO = 0.02
LOOSE = (
    f"--max-failure-ratio={MAX_FAILURE_RATIO}",
    "--max-p95-ttft-ms=60000",
    "--max-p99-e2e-ms=120000",
    "--min-rps=0.02",
    "--max-new-tokens=uniform:4:12",
    "--prompt-words=uniform:4:24",
)


@dataclass(frozen=True)
class Running:
    server: ServerProcess
    churn_root: Path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("locust")
    shape = embedded_shape()
    traffic = ensure_adapters(directory / "traffic", adapter_ids(TRAFFIC_PREFIX, TRAFFIC_ADAPTERS), shape)
    churn = ensure_adapters(directory / "churn", adapter_ids(CHURN_PREFIX, CHURN_ADAPTERS), shape, seed=1000)
    # 4 device slots for 6 traffic + 2 churn adapters: evictions happen during the run.
    with ServerProcess.start(directory / "server.log", [traffic, churn], *server_flags(4)) as server:
        yield Running(server, churn)


def _locust(running: Running, csv_prefix: Path, users: int, seconds: int, extra: tuple[str, ...]) -> str:
    command = locust_command(
        running.server.target,
        csv_prefix,
        users,
        users,
        f"{seconds}s",
        TRAFFIC_ADAPTERS,
        CHURN_ADAPTERS,
        running.churn_root,
        (f"--http-host={running.server.http_url}", *extra),
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def _stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    with Path(f"{csv_prefix}_stats.csv").open() as file:
        return {row["Name"]: row for row in csv.DictReader(file)}


def test_headless_run_with_loose_thresholds_passes(running: Running, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    output = _locust(running, prefix, users=6, seconds=25, extra=LOOSE)
    assert output.startswith("exit 0"), output[-4000:]
    assert "all thresholds met" in output
    stats = _stats(prefix)
    streams = (STREAM + TTFT_SUFFIX, STREAM + E2E_SUFFIX, HTTP_STREAM + TTFT_SUFFIX, HTTP_STREAM + E2E_SUFFIX)
    for name in (*streams, UNARY, ROUTED, ADMIN_LOAD, ADMIN_REPLACE, ADMIN_UNLOAD):
        assert name in stats, f"no '{name}' entry in the CSV: {sorted(stats)}"
        assert int(stats[name]["Request Count"]) > 0, name
    total = stats["Aggregated"]
    assert int(total["Failure Count"]) <= MAX_FAILURE_RATIO * int(total["Request Count"]), total
    assert int(stats[ROUTED]["Failure Count"]) == 0, "a user_key moved between route variants"
    assert int(stats[ADMIN_REPLACE]["Failure Count"]) == 0, "a rewritten adapter did not get a new version"
    ttft, e2e = stats[STREAM + TTFT_SUFFIX], stats[STREAM + E2E_SUFFIX]
    # A stream still running when the run time ends may have its first token but no end.
    assert 0 <= int(ttft["Request Count"]) - int(e2e["Request Count"]) <= 6
    assert 0 < float(ttft["50%"]) <= float(e2e["50%"])
    assert float(ttft["95%"]) <= 60000 and float(e2e["99%"]) <= 120000


def test_missed_threshold_exits_non_zero(running: Running, tmp_path: Path) -> None:
    prefix = tmp_path / "strict"
    extra = ("--max-p95-ttft-ms=1", "--min-rps=1000", "--max-new-tokens=const:2", "StreamUser")
    output = _locust(running, prefix, users=2, seconds=6, extra=extra)
    assert output.startswith("exit 1"), output[-4000:]
    assert "threshold missed: p95 time to first token" in output
    assert "threshold missed: generation throughput" in output
    stats = _stats(prefix)
    assert int(stats[STREAM + TTFT_SUFFIX]["Request Count"]) > 0
    assert int(stats[STREAM + TTFT_SUFFIX]["Failure Count"]) == 0  # the calls worked; only the limits were missed
