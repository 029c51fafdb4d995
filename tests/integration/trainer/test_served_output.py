"""The trainer's output on the real embedded base: PEFT and the loraplex engine both load it and agree.

Same adapter, same chat request → the same greedy tokens from ``PeftModel.generate`` and from the engine; the
server accepts the manifest's base fingerprint; and the manifest's reference embedding (one held-out example, so
the centroid *is* its prompt embedding) equals the prompt embedding the engine pools for that request.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.server.config import load_settings
from loraplex.server.core.types import ChatMessage, Finished, GenerationRequest, SamplingParams, TokenDelta
from loraplex.server.engine.engine import Engine
from loraplex.server.lora.format import MANIFEST_FILE, AdapterLimits, read_adapter
from loraplex.server.model.loader import LoadedBase
from loraplex.trainer.config import load_config
from loraplex.trainer.train import train
from tests.unit.trainer.tiny import write_jsonl

PROMPTS = ["What is the capital of France?", "Name a fruit.", "Say something about the sea."]
HELD_OUT = "Give me a colour."
MAX_NEW = 12


async def _engine_run(engine: Engine, adapter: str, text: str) -> tuple[list[int], Finished]:
    ids: list[int] = []
    finished = None
    request = GenerationRequest(
        request_id=f"{adapter}:{text}",
        adapter_id=adapter,
        messages=(ChatMessage("user", text),),
        sampling=SamplingParams(max_new_tokens=MAX_NEW),
    )
    async for event in engine.generate(request):
        if isinstance(event, TokenDelta):
            ids += event.token_ids
        else:
            finished = event
    assert isinstance(finished, Finished)
    return ids, finished


def _peft_greedy(peft: Any, tokenizer: Any, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = peft.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    generated: list[int] = out[0, ids.shape[1] :].tolist()
    return generated


# DoRA passes too (PEFT and engine agree) but trains and generates ~5x slower in PEFT on CPU: slow marker.
@pytest.mark.parametrize("method", ["lora", pytest.param("dora", marks=pytest.mark.slow)])
def test_peft_and_engine_agree_on_a_trained_adapter(
    method: str, base: LoadedBase, base_dir: str, tmp_path: Path
) -> None:
    records = [{"instruction": text, "output": "Purple elephants dance at midnight."} for text in PROMPTS * 3]
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"instruction": HELD_OUT, "output": "Purple."}])
    root = tmp_path / "adapters"
    config = load_config(
        None,
        {
            "base_model": base_dir,
            "method": method,
            "r": 4,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "datasets": [{"path": str(train_file), "format": "alpaca"}],
            "val_datasets": [{"path": str(val_file), "format": "alpaca"}],
            "max_steps": 5,
            "batch_size": 3,
            "learning_rate": 3e-3,
            "max_length": 96,
            "eval_max_examples": 1,
            "eval_max_new_tokens": 4,
            "output_dir": str(root / method),
            "progress": False,
        },
    )
    train(config)
    out = root / method

    weights = read_adapter(
        method, out, base.shape, AdapterLimits(max_rank=64, max_file_bytes=1 << 26), base_fingerprint=base.fingerprint
    )
    assert weights.use_dora == (method == "dora") and weights.rank == 4
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["base_fingerprint"] == base.fingerprint

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
    expected = [_peft_greedy(peft, base.tokenizer, text) for text in PROMPTS]
    with peft.disable_adapter():
        assert expected != [_peft_greedy(peft, base.tokenizer, text) for text in PROMPTS]  # the adapter matters

    engine = Engine(base, load_settings(environ={}, overrides={"adapters": {"roots": [str(root)]}}))
    engine.start()
    try:

        async def run_all() -> list[tuple[list[int], Finished]]:
            return list(await asyncio.gather(*(_engine_run(engine, method, t) for t in [*PROMPTS, HELD_OUT])))

        results = asyncio.run(run_all())
    finally:
        engine.stop()
    assert [ids for ids, _ in results[:-1]] == expected
    pooled = results[-1][1].prompt_embedding
    assert pooled is not None
    centroid = torch.tensor(manifest["reference"]["embedding_centroid"])
    torch.testing.assert_close(torch.tensor(pooled), centroid, atol=2e-4, rtol=1e-4)
