"""Resilience scenario 2, hot-swap churn: traffic over 20 adapters while cycles of unload / load / replace (a new
version) / pin run on them, against the real server.

Every adapter is a marker adapter (``tests/support/marker_adapters.py``): each of its versions forces one known
token, so every answer is checked by content. Adapters ``a00``-``a13`` are never unloaded (they are replaced and
pinned); ``a14``-``a19`` are also unloaded and loaded again. Goals: no failure on an adapter that is not unloaded;
a request for an unloaded adapter gets NOT_FOUND; no answer ever carries another adapter's token (or its own stale
version's token when no change overlapped the request); the adapters on the device never take more than the device
budget (polled through ListAdapters while the churn runs).

Sizes: 20 cycles in the test suite, 200 with ``LORAPLEX_RESILIENCE_FULL=1``. Each cycle does all four operations.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraplex.client import Client
from loraplex.client.errors import LoraplexError, NotFoundError
from loraplex.client.retry import NO_RETRIES
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.pool import PoolKey, SlotPool
from tests.support.marker_adapters import MarkerBase, write_marker_adapter
from tests.support.resilience import full_run, record
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.resilience

ADAPTERS = tuple(f"a{i:02d}" for i in range(20))
STABLE = ADAPTERS[:14]  # replaced and pinned, never unloaded
CHURNED = ADAPTERS[14:]  # also unloaded and loaded again
CYCLES = 200 if full_run() else 20
TRAFFIC_THREADS = 4
DEVICE_SLOTS = 8
RESIDENT_ADAPTERS = 6  # the byte budget holds this many marker adapters: fewer than the slots, so bytes bind
PROMPTS = ("Write a short poem about the sea.", "The capital of France is", "hello", "1 2 3 4 5 6")


def slot_bytes(shape: ModelShape) -> int:
    """Device bytes of one marker adapter's slot (rank bucket 8, o_proj of every layer, float32)."""
    return SlotPool.bytes_per_slot(PoolKey(rank=8, modules=("o_proj",), dora=False), shape, 4)


@dataclass
class Ledger:
    """What the churn thread changed and when: per adapter an epoch (odd while an operation runs on it), whether
    it is loaded, and the token its serving version forces."""

    tokens: dict[str, tuple[int, int]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    epoch: Counter[str] = field(default_factory=Counter)
    loaded: dict[str, bool] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)  # index into tokens[adapter]

    def snapshot(self, adapter: str) -> tuple[int, bool, int]:
        with self.lock:
            return self.epoch[adapter], self.loaded[adapter], self.tokens[adapter][self.current[adapter]]

    def begin(self, adapter: str) -> None:
        with self.lock:
            self.epoch[adapter] += 1

    def end(self, adapter: str, loaded: bool | None = None, current: int | None = None) -> None:
        with self.lock:
            self.loaded[adapter] = self.loaded[adapter] if loaded is None else loaded
            self.current[adapter] = self.current[adapter] if current is None else current
            self.epoch[adapter] += 1


@dataclass
class Tally:
    ok: int = 0
    not_found: int = 0
    failures: list[str] = field(default_factory=list)  # failed requests on adapters that were not unloaded
    wrong_content: list[str] = field(default_factory=list)  # another adapter's token, a stale one, or garbage
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def marker_base(base_dir: str) -> MarkerBase:
    return MarkerBase.load(base_dir, count=2 * len(ADAPTERS))


@pytest.fixture(scope="module")
def churn_server(
    tmp_path_factory: pytest.TempPathFactory, marker_base: MarkerBase, base_shape: ModelShape
) -> Iterator[tuple[ServerProcess, Path, int]]:
    root = tmp_path_factory.mktemp("churn-adapters")
    for index, adapter in enumerate(ADAPTERS):
        write_marker_adapter(root / adapter, marker_base, marker_base.tokens[2 * index])
    budget = RESIDENT_ADAPTERS * slot_bytes(base_shape)
    flags = (f"--adapters.device-slots={DEVICE_SLOTS}", f"--adapters.device-bytes={budget}")
    log = tmp_path_factory.mktemp("churn-server") / "server.log"
    with ServerProcess.start(log, [root], *flags) as server:
        yield server, root, budget
        assert server.stop() == 0, server.log()[-3000:]


def traffic(client: Client, ledger: Ledger, tally: Tally, stop: threading.Event, seed: int) -> None:
    chooser = random.Random(seed)
    while not stop.is_set():
        adapter = chooser.choice(ADAPTERS)
        before = ledger.snapshot(adapter)
        try:
            result = client.generate(chooser.choice(PROMPTS), adapter=adapter, max_new_tokens=3, ignore_eos=True)
        except NotFoundError as error:
            after = ledger.snapshot(adapter)
            quiet = before[0] == after[0] and before[0] % 2 == 0
            with tally.lock:
                if adapter in CHURNED and not (quiet and before[1]):
                    tally.not_found += 1
                else:
                    tally.failures.append(f"{adapter}: NOT_FOUND while loaded: {error.message}")
            continue
        except LoraplexError as error:
            with tally.lock:
                tally.failures.append(f"{adapter}: {error}")
            continue
        after = ledger.snapshot(adapter)
        quiet = before[0] == after[0] and before[0] % 2 == 0
        own = ledger.tokens[adapter]
        ids = set(result.token_ids)
        with tally.lock:
            if quiet and not before[1]:
                tally.failures.append(f"{adapter}: served while unloaded (v{result.served_by.adapter_version})")
            if len(ids) != 1 or not ids <= set(own) or (quiet and ids != {before[2]}):
                owner = [a for a, pair in ledger.tokens.items() if ids & set(pair)]
                expected = before[2] if quiet else own
                tally.wrong_content.append(f"{adapter}: tokens {result.token_ids} (of {owner}), expected {expected}")
            elif result.served_by.adapter_id != adapter:
                tally.wrong_content.append(f"{adapter}: served_by names {result.served_by.adapter_id}")
            else:
                tally.ok += 1


def answered(tally: Tally) -> int:
    with tally.lock:
        return tally.ok + tally.not_found + len(tally.failures) + len(tally.wrong_content)


def churn(client: Client, root: Path, base: MarkerBase, ledger: Ledger, tally: Tally, cycles: int) -> dict[str, int]:
    """``cycles`` rounds of unload, load, replace and pin/unpin, each on a different adapter; a round ends once the
    traffic has answered a few requests, so the churn never outruns it."""
    chooser = random.Random(7)
    done: Counter[str] = Counter()
    pinned: list[str] = []
    for _ in range(cycles):
        mark = answered(tally)
        loaded_churned = [a for a in CHURNED if ledger.loaded[a]]
        if len(loaded_churned) > 2:  # keep some churned adapters loaded, some not
            victim = chooser.choice(loaded_churned)
            ledger.begin(victim)
            client.unload_adapter(victim)
            ledger.end(victim, loaded=False)
            done["unload"] += 1
        unloaded = [a for a in CHURNED if not ledger.loaded[a]]
        if unloaded:
            back = chooser.choice(unloaded)
            ledger.begin(back)
            client.load_adapter(back)
            ledger.end(back, loaded=True)
            done["load"] += 1
        replaced = chooser.choice([a for a in ADAPTERS if ledger.loaded[a]])
        flip = 1 - ledger.current[replaced]
        ledger.begin(replaced)
        write_marker_adapter(root / replaced, base, ledger.tokens[replaced][flip])
        version = client.load_adapter(replaced).version
        ledger.end(replaced, current=flip)
        done["replace"] += 1
        assert version >= 2, f"replacing {replaced} did not make a new version"
        if len(pinned) >= 2:
            unpin = pinned.pop(0)
            client.load_adapter(unpin, pin=False)
            done["unpin"] += 1
        pin = chooser.choice([a for a in STABLE if a not in pinned])
        client.load_adapter(pin, pin=True)
        pinned.append(pin)
        done["pin"] += 1
        deadline = time.monotonic() + 60
        while answered(tally) < mark + TRAFFIC_THREADS and time.monotonic() < deadline:
            time.sleep(0.02)
    return dict(done)


def watch_residency(client: Client, stop: threading.Event, per_slot: int, peaks: list[int]) -> None:
    while not stop.is_set():
        on_device = sum(1 for a in client.list_adapters() if a.tier == "device")
        peaks.append(on_device * per_slot)
        time.sleep(0.05)


def test_hot_swap_churn_serves_every_adapter_by_content(
    churn_server: tuple[ServerProcess, Path, int], marker_base: MarkerBase
) -> None:
    server, root, budget = churn_server
    tokens = {a: (marker_base.tokens[2 * i], marker_base.tokens[2 * i + 1]) for i, a in enumerate(ADAPTERS)}
    ledger = Ledger(tokens, loaded=dict.fromkeys(ADAPTERS, True), current=dict.fromkeys(ADAPTERS, 0))
    tally = Tally()
    stop = threading.Event()
    peaks: list[int] = []
    with Client(server.target, retry=NO_RETRIES, timeout=120) as client:
        for adapter in ADAPTERS:  # every adapter known to the server before the churn starts
            client.load_adapter(adapter)
        per_slot = budget // RESIDENT_ADAPTERS
        threads = [
            threading.Thread(target=traffic, args=(client, ledger, tally, stop, seed))
            for seed in range(TRAFFIC_THREADS)
        ]
        threads.append(threading.Thread(target=watch_residency, args=(client, stop, per_slot, peaks)))
        for thread in threads:
            thread.start()
        started = time.monotonic()
        try:
            done = churn(client, root, marker_base, ledger, tally, CYCLES)
        finally:
            stop.set()
            for thread in threads:
                thread.join(180)
        elapsed = time.monotonic() - started
        after = {a: client.generate(PROMPTS[0], adapter=a, max_new_tokens=2, ignore_eos=True) for a in STABLE}

    peak = max(peaks)
    requests = answered(tally)
    record(2, "churn cycles", f"{CYCLES} cycles {done} in {elapsed:.0f} s, {requests} requests", "200 cycles", True)
    record(2, "failures on adapters not unloaded", str(len(tally.failures)), "0", not tally.failures)
    record(2, "NOT_FOUND on unloaded adapters", str(tally.not_found), "only these", True)
    record(2, "answers with a wrong adapter's content", str(len(tally.wrong_content)), "0", not tally.wrong_content)
    record(2, "peak device bytes", f"{peak} of {budget}", "<= budget", peak <= budget)
    assert tally.failures == [], tally.failures[:10]
    assert tally.wrong_content == [], tally.wrong_content[:10]
    assert tally.ok > CYCLES * TRAFFIC_THREADS // 2, f"too little traffic ran: {tally.ok} answers"
    assert done["replace"] == CYCLES and done["pin"] == CYCLES and done["unload"] > 0 and done["load"] > 0
    assert 0 < peak <= budget
    for adapter, result in after.items():  # the serving version of every stable adapter answers with its token
        assert set(result.token_ids) == {tokens[adapter][ledger.current[adapter]]}, adapter
