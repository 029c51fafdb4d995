"""Engine → event loop handoff: a step's events for one loop travel in one call, in order; a closed loop is noticed."""

from __future__ import annotations

import asyncio
import threading

from loraplex.server.core.errors import Cancelled
from loraplex.server.core.types import TokenDelta
from loraplex.server.engine.engine import AsyncSink, LoopHandoff


def _delta(text: str) -> TokenDelta:
    return TokenDelta(text=text, token_ids=(len(text),), logprobs=None)


def test_events_of_a_step_arrive_in_one_call_and_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handoff = LoopHandoff(loop)
        calls = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object) -> asyncio.Handle:
            nonlocal calls
            calls += 1
            return original(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        first, second = (AsyncSink(handoff, 100, lambda: True) for _ in range(2))

        def engine_step() -> None:  # another thread, as the engine's
            for index in range(5):
                assert first.push(_delta(f"a{index}")) and second.push(_delta(f"b{index}"))
            second.fail(Cancelled("gone"))
            assert handoff.flush()

        worker = threading.Thread(target=engine_step)
        worker.start()
        worker.join()
        got_first = [(await first.get()) for _ in range(5)]
        got_second = [(await second.get()) for _ in range(6)]
        assert calls == 1
        assert [e.text for e in got_first if isinstance(e, TokenDelta)] == [f"a{i}" for i in range(5)]
        assert [e.text for e in got_second[:5] if isinstance(e, TokenDelta)] == [f"b{i}" for i in range(5)]
        assert isinstance(got_second[5], Cancelled)

    asyncio.run(main())


def test_pushes_off_the_engine_thread_are_handed_over_at_once() -> None:
    async def main() -> None:
        sink = AsyncSink(LoopHandoff(asyncio.get_running_loop()), 100, lambda: False)
        assert sink.push(_delta("now"))
        event = await asyncio.wait_for(sink.get(), timeout=5)  # no flush by anyone: it was handed over already
        assert isinstance(event, TokenDelta) and event.text == "now"

    asyncio.run(main())


def test_a_closed_loop_closes_its_sinks() -> None:
    loop = asyncio.new_event_loop()
    handoff = LoopHandoff(loop)
    sink = AsyncSink(handoff, 100, lambda: True)
    loop.close()
    assert sink.push(_delta("late"))  # gathered; the loop's state shows at the flush
    assert not handoff.flush()
    assert sink.closed and not sink.push(_delta("later"))  # the engine cancels the sequence on this False
