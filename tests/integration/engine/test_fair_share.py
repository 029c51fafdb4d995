"""Fair share on a real engine: a light tenant's requests go ahead of a flooding tenant's backlog, and without
tenants the same requests run first come, first served (the control that shows the test can fail); a light
tenant arriving at a batch the flood fills reclaims a slot within a step or two (with ``engine.fair_share`` off it
waits for a whole generation), and the preempted flood sequences still finish with the right tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loraplex.server.core.types import GenerationRequest, SamplingParams, TokenDelta
from loraplex.server.engine.engine import Engine
from tests.integration.engine.conftest import Outcome, collect

FLOOD = 6


def _request(request_id: str, tenant: str | None) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt="Count from one to ten, slowly.",
        sampling=SamplingParams(max_new_tokens=6, ignore_eos=True),
        tenant=tenant,
    )


def _finish_order(engine: Engine, tenants: bool) -> list[str]:
    """Ids in the order they finished: ``FLOOD`` requests of one tenant, then two of another."""
    requests = [_request(f"heavy-{i}", "heavy" if tenants else None) for i in range(FLOOD)]
    requests += [_request(f"light-{i}", "light" if tenants else None) for i in range(2)]

    async def main() -> list[Outcome]:
        tasks = []
        for request in requests:  # one at a time, so the engine sees them in this order
            tasks.append(asyncio.create_task(collect(engine, request)))
            await asyncio.sleep(0.01)
        return list(await asyncio.gather(*tasks))

    outcomes = asyncio.run(main())
    assert all(outcome.error is None for outcome in outcomes)
    return [outcome.request_id for outcome in sorted(outcomes, key=lambda outcome: outcome.finished_at)]


def test_a_light_tenant_goes_ahead_of_a_flooding_tenants_backlog(engine_factory: Any, tmp_path: Path) -> None:
    engine: Engine = engine_factory([tmp_path], engine={"max_running": 1, "max_queue": 16})
    fair = _finish_order(engine, tenants=True)
    first_come = _finish_order(engine, tenants=False)
    assert first_come[-2:] == ["light-0", "light-1"]  # one tenant's counter: arrival order
    # The light tenant starts level with the heavy one (no credit banked, none lost) and is behind it from the
    # heavy tenant's next request on: both its requests finish within the first five, not last.
    assert fair.index("light-0") <= 3 and fair.index("light-1") <= 4, fair
    assert [i for i in fair if i.startswith("heavy")] == [f"heavy-{i}" for i in range(FLOOD)]  # FIFO within a tenant


def _steps_to_first_token(engine: Engine, flood_size: int) -> tuple[int, list[list[int]]]:
    """Engine steps from a light tenant's submit to its first token while a flooding tenant fills the batch, and
    the flood's generated tokens (greedy, one prompt: all equal, however often they were preempted)."""
    flood = [
        GenerationRequest(
            request_id=f"flood-{i}",
            prompt="Count from one to ten, slowly.",
            sampling=SamplingParams(max_new_tokens=40, ignore_eos=True),
            tenant="flood",
        )
        for i in range(flood_size)
    ]
    light = _request("light", "light")

    async def main() -> tuple[int, list[Outcome]]:
        tasks = [asyncio.create_task(collect(engine, request)) for request in flood]
        while engine.stats().running < engine.settings.engine.max_running or engine.steps < 3:
            await asyncio.sleep(0.005)
        submitted = engine.steps
        async for event in engine.generate(light):
            if isinstance(event, TokenDelta):
                first = engine.steps
                break
        return first - submitted, list(await asyncio.gather(*tasks))

    steps, outcomes = asyncio.run(main())
    assert all(outcome.error is None and len(outcome.token_ids) == 40 for outcome in outcomes)
    return steps, [outcome.token_ids for outcome in outcomes]


def test_a_light_tenant_reclaims_a_slot_of_a_full_batch_within_a_step_or_two(
    engine_factory: Any, tmp_path: Path
) -> None:
    limits = {"max_running": 2, "max_queue": 4}
    fair = engine_factory([tmp_path], engine=limits)
    steps, tokens = _steps_to_first_token(fair, 4)
    assert steps <= 3, f"the light tenant's first token came {steps} steps after it arrived"
    assert all(ids == tokens[0] for ids in tokens)  # preempted flood sequences resumed to the same greedy tokens
    first_come = engine_factory([tmp_path], engine={**limits, "fair_share": False})
    waited, _ = _steps_to_first_token(first_come, 4)
    assert waited >= 30, waited  # the control: behind the flood, it waits for a whole generation
