"""``make loadtest``: a real server with N synthetic adapters, a short headless Locust run against it, its exit code.

Writes N traffic adapters once into the cache (reused by later runs) and a few churn adapters into a fresh
directory (AdminUser rewrites those), starts ``loraplex-server`` on a free loopback port with a device cache smaller
than N, waits for health SERVING, runs ``loadtests/locustfile.py`` headless (CSV under ``--out``), sends SIGTERM
and exits with Locust's code (0: every threshold met).

    .venv/bin/python loadtests/run_loadtest.py                           # 16 adapters, 6 users, 30 s
    .venv/bin/python loadtests/run_loadtest.py --adapters 64 --users 12 --run-time 2m -- --max-p95-ttft-ms 3000

Arguments after ``--`` go to Locust unchanged (any option of the locustfile, e.g. --zipf-s or --max-new-tokens).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the server launcher shared with the integration tests

from loadtests.synthetic_adapters import QV, write_adapter  # noqa: E402
from loadtests.workload import adapter_ids  # noqa: E402
from loraplex.server.config import default_cache_dir  # noqa: E402
from loraplex.server.core.shape import ModelShape  # noqa: E402
from loraplex.server.lora.format import CONFIG_FILE  # noqa: E402
from loraplex.server.model.embedded import resolve_model_dir  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
TRAFFIC_PREFIX = "synthetic-"
CHURN_PREFIX = "churn-"
# Loose limits for a short run on a busy 2-core machine: they catch a broken server, not a slow one.
LOOSE_THRESHOLDS = (
    "--max-failure-ratio=0.02",
    "--max-p95-ttft-ms=30000",
    "--max-p99-e2e-ms=90000",
    "--min-rps=0.05",
)


def embedded_shape(base_model: str = "embedded") -> ModelShape:
    """The shape of the base model the server will load (from its config only; no weights are read)."""
    return ModelShape.from_config(AutoConfig.from_pretrained(resolve_model_dir(base_model, default_cache_dir())))


def ensure_adapters(
    root: Path, ids: Sequence[str], shape: ModelShape, ranks: Sequence[int] = (8,), seed: int = 0
) -> Path:
    """Writes the synthetic q,v float16 adapters of ``ids`` that ``root`` lacks (deterministic per id; the rank of
    each is drawn from ``ranks`` by its own seed). The config file is written last, so a half-written adapter (an
    interrupted run) is written again."""
    import torch

    for index, adapter_id in enumerate(ids):
        if not (root / adapter_id / CONFIG_FILE).exists():
            rank = random.Random(seed + index).choice(ranks)
            write_adapter(root / adapter_id, shape, rank, QV, seed=seed + index, dtype=torch.float16)
    return root


def server_flags(device_slots: int) -> tuple[str, ...]:
    return (
        f"--adapters.device-slots={device_slots}",
        "--engine.kv-cache-tokens=8192",
        "--engine.max-running=16",
        "--server.default-max-new-tokens=16",
    )


def locust_command(
    target: str,
    csv_prefix: Path,
    users: int,
    spawn_rate: float,
    run_time: str,
    adapters: int,
    churn: int,
    churn_root: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """The headless Locust command line against ``target`` (CSV files at ``csv_prefix``_*.csv)."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        target,
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "-t",
        run_time,
        "--stop-timeout",
        "30",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--adapter-prefix",
        TRAFFIC_PREFIX,
        "--adapter-count",
        str(adapters),
        "--churn-prefix",
        CHURN_PREFIX,
        "--churn-count",
        str(churn),
        "--churn-root",
        str(churn_root),
        *extra,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=16, help="traffic adapters (Zipf popularity)")
    parser.add_argument("--churn", type=int, default=2, help="adapters reserved for AdminUser")
    parser.add_argument("--device-slots", type=int, default=8, help="device adapter slots (fewer than --adapters)")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--spawn-rate", type=float, default=3.0)
    parser.add_argument("--run-time", default="30s")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "loadtest")
    parser.add_argument("--no-default-thresholds", action="store_true", help="leave out the loose limits")
    parser.add_argument("locust_args", nargs="*", help="after --: passed to Locust")
    args = parser.parse_args(argv)

    shape = embedded_shape()
    traffic_root = ensure_adapters(
        default_cache_dir() / "loadtest-adapters" / f"{shape.hidden_size}x{shape.num_layers}",
        adapter_ids(TRAFFIC_PREFIX, args.adapters),
        shape,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    thresholds = () if args.no_default_thresholds else LOOSE_THRESHOLDS
    with tempfile.TemporaryDirectory(prefix="loadtest-") as scratch:
        churn_root = ensure_adapters(Path(scratch) / "churn", adapter_ids(CHURN_PREFIX, args.churn), shape, seed=1000)
        log = args.out / "server.log"
        with ServerProcess.start(log, [traffic_root, churn_root], *server_flags(args.device_slots)) as server:
            print(f"server {server.target} (log {log}), {args.adapters} adapters + {args.churn} churn", flush=True)
            command = locust_command(
                server.target,
                args.out / "locust",
                args.users,
                args.spawn_rate,
                args.run_time,
                args.adapters,
                args.churn,
                churn_root,
                [f"--http-host={server.http_url}", *thresholds, *args.locust_args],
            )
            code = subprocess.run(command, check=False).returncode
            stopped = server.stop()
    print(f"locust exit code {code}; server exit code {stopped}; CSV under {args.out}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
