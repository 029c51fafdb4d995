"""Adapters churn through the device slots while other requests decode, and every answer stays PEFT's.

The real engine over the embedded base with two device slots and four adapters of one pool (ranks 4 and 8 share the
rank-8 bucket): one long request holds a slot for the whole run while the other slot is written again and again for
short requests of the other adapters, each write between steps that keep decoding the long one. Every request's
greedy tokens equal ``PeftModel.generate`` with its adapter alone (log-probabilities within 1e-3), and the copy
stream's fences were asked for the waits the ordering needs: each step that first reads a written slot waited for
its write, and each write into a slot a step had read waited for that step (on CPU these waits are no-ops; on CUDA
they are device-side event waits, see tests/integration/engine/test_cuda.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.server.core.events import EngineListener, Tier
from loraplex.server.core.types import ChatMessage, GenerationRequest, SamplingParams
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import LoadedBase
from tests.integration.engine.conftest import run_all
from tests.support.adapters import QV, write_adapter_set
from tests.support.peft_oracle import peft_generate, peft_with_adapters

ADAPTERS: dict[str, dict[str, Any]] = {
    "long": {"rank": 8, "targets": QV, "strength": 2.0},
    "r8-a": {"rank": 8, "targets": QV, "strength": 2.0},
    "r4": {"rank": 4, "targets": QV, "strength": 3.0},
    "r8-b": {"rank": 8, "targets": QV, "strength": 2.0},
}
# (adapter, prompt, max_new_tokens): the long request outlives three turns of the second slot
ROWS: list[tuple[str | None, str, int]] = [
    ("long", "Write a short story about a dragon who lives in a library.", 24),
    ("r8-a", "Name a planet.", 5),
    ("r4", "Give me a color.", 5),
    ("r8-b", "What do bees make?", 5),
    (None, "Count to three.", 5),
    ("r8-a", "Name a fruit.", 5),
]


class DeviceWrites(EngineListener):
    def __init__(self) -> None:
        self.writes = 0

    def adapter_loaded(self, tier: Tier, outcome: Literal["ok", "rejected", "error"], seconds: float) -> None:
        self.writes += tier == "device"


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, base: LoadedBase) -> Path:
    return write_adapter_set(tmp_path_factory.mktemp("adapters"), base.shape, ADAPTERS)


def test_churning_slots_keep_every_answer_peft_exact(
    engine_factory: Any, base: LoadedBase, base_dir: str, adapter_root: Path
) -> None:
    writes = DeviceWrites()
    engine: Engine = engine_factory(
        [adapter_root], writes, engine={"max_running": 4, "adapter_prefetch": 2}, adapters={"device_slots": 2}
    )
    requests = [
        GenerationRequest(
            request_id=f"r{i}",
            messages=(ChatMessage("user", prompt),),
            adapter_id=adapter,
            sampling=SamplingParams(max_new_tokens=max_new, logprobs=True),
        )
        for i, (adapter, prompt, max_new) in enumerate(ROWS)
    ]
    outcomes = run_all(engine, requests)
    peft = peft_with_adapters(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_root, list(ADAPTERS)
    )
    for (adapter, prompt, max_new), outcome in zip(ROWS, outcomes, strict=True):
        assert outcome.error is None, outcome.error
        prompt_ids = engine.tokenize(messages=(ChatMessage("user", prompt),))
        want_tokens, want_logprobs = peft_generate(peft, adapter, prompt_ids, max_new)
        assert outcome.token_ids == want_tokens, f"{adapter}: {outcome.text!r}"
        assert max(abs(a - b) for a, b in zip(outcome.logprobs, want_logprobs, strict=True)) <= 1e-3
    long_done, short_done = outcomes[0].finished_at, max(o.finished_at for o in outcomes[1:4])
    assert short_done < long_done, "the short requests did not churn the second slot while the long one decoded"
    copies = engine.slots.copies
    assert writes.writes >= 5  # four adapters through two slots, r8-a twice
    assert copies.compute_waits >= 4  # every adapter's write was waited for by the first step that read it
    assert copies.copy_waits >= 2  # slot writes after the steps that read the slot, waited for on the copy stream
    assert len(engine.slots.pools) == 1 and engine.slots.reallocations == 0
