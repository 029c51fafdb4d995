"""Several real ``loraplex-server`` processes on free loopback ports (the scale-out test and benchmark), and what
each of them served: per-replica ``requests_served`` of every adapter (``Adapters/ListAdapters``) identifies the
replica that served an adapter without any change to the server."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loraplex.client import Client
from tests.support.server_process import ServerProcess

SERVING = re.compile(r"loraplex\.server: serving")
# Replicas of the embedded base share this machine: a small KV cache (~1.5 GB resident) and one torch thread each.
SMALL = ("--engine.kv-cache-tokens", "4096", "--engine.max-seq-len", "1024", "--model.threads", "1")

Served = dict[str, int]  # adapter id -> requests served by one replica


@contextmanager
def running_replicas(
    count: int, log_dir: Path, adapter_roots: Sequence[Path], *flags: str, cpus: Sequence[int] = ()
) -> Iterator[list[ServerProcess]]:
    """``count`` servers, started side by side (they load the base model at the same time); killed on exit.
    With ``cpus``, replica ``i`` runs pinned to CPU ``cpus[i % len(cpus)]`` (``taskset``): its own CPU budget."""
    replicas: list[ServerProcess] = []
    try:
        for index in range(count):
            log = log_dir / f"replica-{index}.log"
            pinned = ("taskset", "-c", str(cpus[index % len(cpus)])) if cpus else ()
            program = (*pinned, sys.executable, "-m", "loraplex.server.main")
            replicas.append(ServerProcess.start(log, adapter_roots, *SMALL, *flags, wait="listening", program=program))
        for replica in replicas:
            replica.wait_for_log(SERVING)
        yield replicas
    finally:
        for replica in replicas:
            replica.kill()


def alive(replica: ServerProcess) -> bool:
    return replica.process.poll() is None


def served(replicas: Sequence[ServerProcess]) -> list[Served]:
    """What each replica has served so far, by adapter (a dead replica: nothing)."""
    counts: list[Served] = []
    for replica in replicas:
        if not alive(replica):
            counts.append({})
            continue
        with Client(replica.target, timeout=30) as client:
            counts.append({a.adapter_id: a.requests_served for a in client.list_adapters()})
    return counts


def served_since(before: Sequence[Served], after: Sequence[Served]) -> list[Served]:
    return [
        {adapter: count - old.get(adapter, 0) for adapter, count in new.items() if count > old.get(adapter, 0)}
        for old, new in zip(before, after, strict=True)
    ]


def owners(delta: Sequence[Served]) -> dict[str, list[int]]:
    """Adapter id -> the replicas (indices) that served it in ``delta``."""
    found: dict[str, list[int]] = {}
    for index, counts in enumerate(delta):
        for adapter in counts:
            found.setdefault(adapter, []).append(index)
    return found
