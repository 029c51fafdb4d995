"""The nf4-quantized base (bitsandbytes, on this CPU) against PEFT on the same nf4 base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.server.config import ModelSettings
from loraplex.server.engine.types import ChatMessage, GenerationRequest, SamplingParams
from loraplex.server.model.loader import LoadedBase, load_base, quantization_config, quiet_bitsandbytes
from tests.integration.engine.conftest import make_engine, run_all
from tests.support.adapters import ALL_LINEAR, QV, write_adapter

ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r8": {"rank": 8, "targets": QV, "strength": 2.0},
    "all-r16": {"rank": 16, "targets": ALL_LINEAR},
    "qv-r4-dora": {"rank": 4, "targets": QV, "use_dora": True, "strength": 2.0},
}
PROMPTS = ["Name a planet.", "What is 7 times 6?", "Give me a color.", "Say hello in French."]
MAX_NEW = 8


@pytest.fixture(scope="module")
def nf4_base(base_dir: str) -> LoadedBase:
    return load_base(ModelSettings(base_model=base_dir, quantization="nf4"))


def test_nf4_engine_matches_peft_on_nf4(nf4_base: LoadedBase, base: LoadedBase, base_dir: str, tmp_path: Path) -> None:
    assert nf4_base.quantization == "nf4"
    assert nf4_base.fingerprint == base.fingerprint  # same base, so adapters trained on either are accepted
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        write_adapter(tmp_path / name, nf4_base.shape, seed=seed, **kwargs)
    quiet_bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=torch.float32,
        quantization_config=quantization_config("nf4", torch.float32),
        device_map={"": "cpu"},
    )
    names = list(ADAPTERS)
    peft = PeftModel.from_pretrained(model, tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(tmp_path / name, adapter_name=name)
    peft.eval()

    engine = make_engine(nf4_base, [tmp_path], engine={"max_running": 8})
    try:
        rows: list[str | None] = [*names, None]
        requests = [
            GenerationRequest(
                request_id=f"r{i}",
                messages=(ChatMessage("user", p),),
                adapter_id=name,
                sampling=SamplingParams(max_new_tokens=MAX_NEW, logprobs=True),
            )
            for i, (name, p) in enumerate(zip(rows, PROMPTS, strict=True))
        ]
        outcomes = run_all(engine, requests)
        for name, prompt, outcome in zip(rows, PROMPTS, outcomes, strict=True):
            assert outcome.error is None, outcome.error
            ids = torch.tensor([engine.tokenize(messages=(ChatMessage("user", prompt),))])
            with torch.no_grad():
                if name is None:
                    with peft.disable_adapter():
                        out = peft.generate(
                            input_ids=ids,
                            max_new_tokens=MAX_NEW,
                            do_sample=False,
                            output_logits=True,
                            return_dict_in_generate=True,
                        )
                else:
                    peft.set_adapter(name)
                    out = peft.generate(
                        input_ids=ids,
                        max_new_tokens=MAX_NEW,
                        do_sample=False,
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
            tokens = out.sequences[0, ids.shape[1] :].tolist()
            assert outcome.token_ids == tokens, name
            want = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens, strict=True)]
            assert max(abs(a - b) for a, b in zip(outcome.logprobs, want, strict=True)) <= 1e-3, name
    finally:
        engine.stop()
