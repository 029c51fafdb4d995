"""Engine behaviour with the real base: continuous batching, adapter lifecycle, limits, cancellation, bad input."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from loraplex.server.config import load_settings
from loraplex.server.core.errors import (
    AdapterNotFound,
    AdapterRejected,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
)
from loraplex.server.core.events import EngineListener
from loraplex.server.core.types import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    ResidencyTier,
    SamplingParams,
    TokenDelta,
)
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import LoadedBase
from tests.integration.engine.conftest import collect, run_all
from tests.support.adapters import QV, write_adapter

_counter = iter(range(10**9))


def req(prompt: str = "Name a planet.", adapter: str | None = None, **sampling: Any) -> GenerationRequest:
    sampling.setdefault("max_new_tokens", 8)
    return GenerationRequest(
        request_id=f"t{next(_counter)}",
        messages=(ChatMessage("user", prompt),),
        adapter_id=adapter,
        sampling=SamplingParams(**sampling),
    )


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def root(tmp_path: Path, base: LoadedBase) -> Path:
    for seed in range(5):
        write_adapter(tmp_path / f"a{seed}", base.shape, rank=8, targets=QV, seed=seed, strength=2.0)
    return tmp_path


def test_short_request_finishes_while_long_one_runs(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root])

    async def main() -> None:
        long_task = asyncio.create_task(collect(engine, req("Tell a long story.", max_new_tokens=120, ignore_eos=True)))
        await wait_until(lambda: engine.stats().running == 1)
        short = await collect(engine, req("Say hi.", adapter="a1", max_new_tokens=4, ignore_eos=True))
        assert short.error is None and short.finished is not None
        assert not long_task.done(), "the short request should finish while the long one still runs"
        long = await long_task
        assert long.finished is not None and long.finished.usage.completion_tokens == 120
        assert short.finished_at < long.finished_at

    asyncio.run(main())


def test_replacing_an_adapter_keeps_running_requests_on_their_version(
    engine_factory: Any, root: Path, base: LoadedBase
) -> None:
    engine: Engine = engine_factory([root])
    prompt = dict(prompt="Write a sentence about boats.", adapter="a0", max_new_tokens=24, ignore_eos=True)
    v1_alone = run_all(engine, [req(**prompt)])[0]

    async def main() -> tuple[Any, Any]:
        running = engine.generate(req(**prompt))
        first = await anext(running)
        assert isinstance(first, TokenDelta)
        write_adapter(root / "a0", base.shape, rank=8, targets=QV, seed=99, strength=2.0)
        version = await asyncio.wrap_future(engine.load_adapter("a0"))
        assert version.version == 2
        newer = await collect(engine, req(**prompt))
        rest = [event async for event in running]
        return [first, *rest], newer

    old_events, newer = asyncio.run(main())
    finished = old_events[-1]
    assert finished.adapter_version == 1
    assert [t for e in old_events[:-1] for t in e.token_ids] == v1_alone.token_ids
    assert newer.finished.adapter_version == 2
    v2_alone = run_all(engine, [req(**prompt)])[0]
    assert newer.token_ids == v2_alone.token_ids != v1_alone.token_ids
    assert engine.adapter_info("a0").version == 2


def test_unload_fails_waiting_requests_and_new_ones(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root], engine={"max_running": 1})
    engine.load_adapter("a2").result()

    async def main() -> None:
        blocker = asyncio.create_task(collect(engine, req(max_new_tokens=60, ignore_eos=True)))
        await wait_until(lambda: engine.stats().running == 1)
        waiting = asyncio.create_task(collect(engine, req(adapter="a2")))
        await wait_until(lambda: engine.stats().waiting == 1)
        engine.unload_adapter("a2")
        outcome = await waiting
        assert isinstance(outcome.error, AdapterNotFound)
        with pytest.raises(AdapterNotFound, match="unloaded"):
            engine.submit(req(adapter="a2"), sink=None)  # type: ignore[arg-type]
        assert (await blocker).error is None

    asyncio.run(main())
    engine.load_adapter("a2").result()  # loading again brings it back
    assert run_all(engine, [req(adapter="a2")])[0].error is None


def test_eviction_through_two_slots_keeps_outputs_exact(engine_factory: Any, root: Path) -> None:
    requests = [req(f"Question {i}: name an animal.", adapter=f"a{i % 5}", max_new_tokens=6) for i in range(10)]
    roomy = run_all(engine_factory([root]), requests)
    tight: Engine = engine_factory([root], adapters={"device_slots": 2})
    squeezed = run_all(tight, [GenerationRequest(**{**r.__dict__, "request_id": r.request_id + "b"}) for r in requests])
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert len({tuple(o.token_ids) for o in roomy}) > 1
    assert tight.slots.used_slots <= 2


def test_pinned_adapter_is_never_evicted(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root], adapters={"device_slots": 2})
    engine.load_adapter("a0", pin=True).result()
    run_all(engine, [req(adapter=f"a{i}") for i in (1, 2, 3, 4, 1)])
    info = engine.adapter_info("a0")
    assert info.pinned and info.tier is ResidencyTier.DEVICE
    assert (
        engine.adapter_info("a4").tier is not ResidencyTier.DEVICE
        or engine.adapter_info("a1").tier is not ResidencyTier.DEVICE
    )


def test_cancel_and_deadline_free_the_sequence(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root])

    async def main() -> None:
        stream = engine.generate(req(max_new_tokens=500, ignore_eos=True))
        await anext(stream)
        assert engine.stats().running == 1
        await stream.aclose()  # the client went away
        await wait_until(lambda: engine.stats().running == 0, timeout=2)
        late = req(max_new_tokens=500, ignore_eos=True)
        late = GenerationRequest(**{**late.__dict__, "deadline": time.monotonic() + 0.5})
        outcome = await collect(engine, late)
        assert isinstance(outcome.error, DeadlineExceeded)
        assert 0 < len(outcome.token_ids) < 500
        await wait_until(lambda: engine.stats().running == 0, timeout=2)
        assert engine.kv.allocator.num_used == 0

    asyncio.run(main())


def test_a_drain_keeps_requests_accepted_before_it_still_on_the_submitter_thread(
    engine_factory: Any, root: Path
) -> None:
    """A request is accepted when ``generate`` is called; its validation and tokenization run later on the
    submitter thread. A drain beginning in between must wait for it and serve it, not refuse it (the race that lost
    an accepted stream under SIGTERM); a request arriving after the drain began is refused at once."""
    engine: Engine = engine_factory([root])
    gate = threading.Event()
    engine._submitter.submit(gate.wait)  # holds the submitter thread, as a slow tokenization would

    async def main() -> None:
        accepted = asyncio.create_task(collect(engine, req(max_new_tokens=4, ignore_eos=True)))
        await asyncio.sleep(0.05)  # generate() has run up to its hand-off to the submitter
        engine.begin_drain()
        assert not engine.wait_idle(0.1)  # the accepted request counts although the engine has not seen it yet
        late = await collect(engine, req(max_new_tokens=4, ignore_eos=True))
        assert isinstance(late.error, ShuttingDown)
        gate.set()
        outcome = await accepted
        assert outcome.error is None and len(outcome.token_ids) == 4
        assert engine.wait_idle(5)

    asyncio.run(main())


def test_kv_blocks_follow_tokens_not_max_new_tokens(engine_factory: Any, root: Path) -> None:
    """With a 4,096-token cache, requests allowed 512 new tokens each all run at once: a sequence holds blocks
    for the tokens it has, not for its ``max_new_tokens`` (a reservation would have fit 7), and the usage metric
    counts the blocks in use (prefix cache off: the prompts' shared chat-template blocks would count once)."""
    settings = {"kv_cache_tokens": 4096, "max_running": 40, "max_seq_len": 4096, "prefix_cache": False}
    engine: Engine = engine_factory([root], engine=settings)

    async def main() -> None:
        requests = [req(f"Item {i}.", max_new_tokens=512, ignore_eos=True) for i in range(40)]
        tasks = [asyncio.create_task(collect(engine, r)) for r in requests]
        await wait_until(lambda: engine.stats().running == 40, timeout=60)
        prompt = len(engine.tokenize(messages=requests[0].messages))
        assert 4096 // (prompt + 512) < 8
        low, high = (40 * engine.kv.blocks_for(n) for n in (prompt, prompt + 64))  # a few steps in: < 64 tokens
        assert low <= engine.kv.allocator.num_used <= high
        assert low / engine.kv.num_blocks <= engine.stats().kv_cache_usage <= high / engine.kv.num_blocks
        for r in requests:
            engine.cancel(r.request_id)
        outcomes = await asyncio.gather(*tasks)
        assert all(isinstance(o.error, Cancelled) for o in outcomes)
        await wait_until(lambda: engine.kv.allocator.num_used == 0)

    asyncio.run(main())


def test_full_queue_is_refused_at_once(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root], engine={"max_running": 1, "max_queue": 2})

    async def main() -> None:
        tasks = [asyncio.create_task(collect(engine, req(max_new_tokens=30, ignore_eos=True)))]
        await wait_until(lambda: engine.stats().running == 1)
        tasks += [asyncio.create_task(collect(engine, req(max_new_tokens=30, ignore_eos=True))) for _ in range(2)]
        await wait_until(lambda: engine.stats().waiting == 2)
        steps = engine.steps
        with pytest.raises(Overloaded, match=r"engine\.max_queue=2"):
            engine.submit(req(), sink=None)  # type: ignore[arg-type]
        assert engine.steps - steps <= 1  # refused within the step under way, not after a queue slot freed
        assert engine.stats().waiting == 2 and not any(task.done() for task in tasks)
        outcomes = await asyncio.gather(*tasks)
        assert all(o.error is None for o in outcomes)

    asyncio.run(main())


def test_free_running_slots_do_not_count_against_the_queue(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root], engine={"max_running": 3, "max_queue": 1})
    outcomes = run_all(engine, [req(f"Item {i}.", max_new_tokens=2) for i in range(4)])  # all before a step
    assert [o.error for o in outcomes] == [None] * 4


def test_small_kv_cache_queues_instead_of_failing(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root], engine={"kv_cache_tokens": 300, "max_seq_len": 120})
    outcomes = run_all(engine, [req(f"Item {i}.", max_new_tokens=40, ignore_eos=True) for i in range(6)])
    assert all(o.error is None and o.finished.usage.completion_tokens == 40 for o in outcomes)  # type: ignore[union-attr]
    assert engine.kv.allocator.num_used == 0


def test_stop_strings_seeds_and_chat(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root])
    plain = run_all(engine, [req("What is the capital of France?", max_new_tokens=20)])[0]
    assert "Paris" in plain.text
    stopped = run_all(engine, [req("What is the capital of France?", max_new_tokens=20, stop=("Paris",))])[0]
    assert stopped.finished.finish_reason is FinishReason.STOP  # type: ignore[union-attr]
    assert stopped.text == plain.text[: plain.text.index("Paris")]
    sampled = [req("Invent a name.", max_new_tokens=12, temperature=1.0, seed=s) for s in (5, 5, 6)]
    first, again, other = run_all(engine, sampled)
    assert first.token_ids == again.token_ids != other.token_ids


@pytest.mark.parametrize(
    ("request_kwargs", "error", "message"),
    [
        ({"prompt": ""}, InvalidRequest, "exactly one non-empty prompt"),
        ({"max_new_tokens": 0}, InvalidRequest, "max_new_tokens must be"),
        ({"temperature": -1.0}, InvalidRequest, "temperature must be"),
        ({"top_p": 0.0}, InvalidRequest, "top_p must be"),
        ({"repetition_penalty": float("nan")}, InvalidRequest, "repetition_penalty"),
        ({"prompt": "word " * 5000}, InvalidRequest, "more than the limit"),
        ({"adapter": "../escape"}, InvalidRequest, "not a name"),
        ({"adapter": "/etc/passwd"}, InvalidRequest, "not a name"),
        ({"adapter": "nope"}, AdapterNotFound, "not found under"),
    ],
)
def test_bad_requests_get_typed_errors(
    engine_factory: Any, root: Path, request_kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    engine: Engine = engine_factory([root])
    prompt = request_kwargs.pop("prompt", "Hello")
    adapter = request_kwargs.pop("adapter", None)
    request = req(prompt, adapter, **request_kwargs)
    if not prompt:
        request = GenerationRequest(request_id="empty", prompt="", sampling=request.sampling)
    with pytest.raises(error, match=message):
        engine.submit(request, sink=None)  # type: ignore[arg-type]


def test_bad_adapters_fail_their_requests_and_the_engine_keeps_serving(
    engine_factory: Any, root: Path, tmp_path_factory: pytest.TempPathFactory, base: LoadedBase
) -> None:
    (root / "nan").mkdir()
    write_adapter(root / "nan", base.shape, rank=4)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / "nan" / "adapter_model.safetensors"))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(root / "nan" / "adapter_model.safetensors"))
    write_adapter(root / "too-big-rank", base.shape, rank=256)
    outside = tmp_path_factory.mktemp("outside")
    write_adapter(outside / "x", base.shape, rank=4)
    os.symlink(outside / "x", root / "escape")
    engine: Engine = engine_factory([root])
    outcomes = run_all(engine, [req(adapter="nan"), req(adapter="too-big-rank"), req(adapter="a0")])
    assert isinstance(outcomes[0].error, AdapterRejected) and "NaN or Inf" in str(outcomes[0].error)
    assert isinstance(outcomes[1].error, AdapterRejected) and "maximum 128" in str(outcomes[1].error)
    assert outcomes[2].error is None
    with pytest.raises(AdapterRejected, match="outside its adapter root"):
        engine.submit(req(adapter="escape"), sink=None)  # type: ignore[arg-type]
    with pytest.raises(AdapterRejected, match="NaN or Inf"):
        engine.load_adapter("nan").result()
    assert run_all(engine, [req(adapter="a1")])[0].error is None


def test_cancel_reason_reaches_the_caller(engine_factory: Any, root: Path) -> None:
    engine: Engine = engine_factory([root], engine={"max_running": 1})

    async def main() -> None:
        blocker = asyncio.create_task(collect(engine, req(max_new_tokens=40, ignore_eos=True)))
        await wait_until(lambda: engine.stats().running == 1)
        queued = req()
        task = asyncio.create_task(collect(engine, queued))
        await wait_until(lambda: engine.stats().waiting == 1)
        assert engine.cancel(queued.request_id)
        assert isinstance((await task).error, Cancelled)
        await blocker

    asyncio.run(main())


class RecordingListener(EngineListener):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def step(self, rows: int, sequences: int, adapters: int, seconds: float) -> None:
        self.events.append(("step", rows, sequences, adapters))

    def adapter_lookup(self, tier: str, hit: bool) -> None:  # type: ignore[override]
        self.events.append(("lookup", tier, hit))

    def adapter_loaded(self, tier: str, outcome: str, seconds: float) -> None:  # type: ignore[override]
        self.events.append(("loaded", tier, outcome))

    def adapter_evicted(self, tier: str) -> None:  # type: ignore[override]
        self.events.append(("evicted", tier))


def test_listener_sees_steps_loads_and_evictions(base: LoadedBase, root: Path) -> None:
    listener = RecordingListener()
    settings = load_settings(environ={}, overrides={"adapters": {"roots": [str(root)], "device_slots": 2}})
    engine = Engine(base, settings, listener=listener)
    engine.start()
    try:
        outcomes = run_all(engine, [req(adapter=f"a{i}", max_new_tokens=3) for i in range(3)])
        assert all(o.error is None for o in outcomes)
        run_all(engine, [req(adapter="a0", max_new_tokens=2)])
    finally:
        engine.stop()
    events = listener.events
    assert events.count(("loaded", "host", "ok")) == 3
    assert ("lookup", "host", False) in events and ("lookup", "host", True) in events
    assert ("loaded", "device", "ok") in events and ("evicted", "device") in events
    steps = [e for e in events if e[0] == "step"]
    assert max(e[3] for e in steps) == 2  # two slots: at most two adapters share a step
    assert all(e[2] <= e[1] for e in steps)  # never more sequences than rows


def test_a_deep_queue_of_distinct_adapters_reads_each_from_disk_once(base: LoadedBase, root: Path) -> None:
    # The host cache holds two of the five adapters and one request runs at a time: were every queued request's
    # adapter read when it arrived, later reads would evict earlier ones before their requests ran.
    listener = RecordingListener()
    overrides = {
        "adapters": {"roots": [str(root)], "host_bytes": 4 << 20, "device_slots": 1},
        "engine": {"max_running": 1, "max_queue": 8},
    }
    engine = Engine(base, load_settings(environ={}, overrides=overrides), listener=listener)
    engine.start()
    try:
        outcomes = run_all(engine, [req(f"Item {i}.", adapter=f"a{i}", max_new_tokens=2) for i in range(5)])
    finally:
        engine.stop()
    assert [o.error for o in outcomes] == [None] * 5
    assert listener.events.count(("loaded", "host", "ok")) == 5
    assert ("evicted", "host") in listener.events  # the cache was too small for all five
