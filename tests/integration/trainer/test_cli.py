"""``loraplex-train`` end to end on the tiny base: train, eval, export (merge + ONNX), and bad input refused early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.trainer.cli import main
from loraplex.trainer.export import ONNX_FILE
from tests.unit.trainer.tiny import alpaca_records, config_tree, write_jsonl


def test_train_eval_export(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_records(16))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config_tree(tiny_base, train_file, tmp_path / "out")))
    main(["train", str(config_file), "--max-steps", "3", "--target-modules", "all-linear"])
    out = tmp_path / "out"
    assert json.loads((out / "loraplex.json").read_text())["training"]["max_steps"] == 3
    assert "| exact_match |" in capsys.readouterr().out

    main(["eval", str(out), "--data", f"{train_file}:alpaca", "--max-examples", "2", "--output", str(tmp_path / "ev")])
    report = json.loads((tmp_path / "ev" / "eval_report.json").read_text())
    assert report["num_examples"] == 16 and report["num_generated"] == 2
    assert set(report["adapter"]) >= {"loss", "perplexity", "exact_match", "token_f1", "rouge_l"}
    assert report["adapter"]["loss"] != report["base"]["loss"]

    # reference: recomputed on other held-out data, written into the manifest, everything else kept
    before = json.loads((out / "loraplex.json").read_text())
    held = write_jsonl(tmp_path / "held.jsonl", alpaca_records(5))
    main(["reference", str(out), "--data", f"{held}:alpaca"])
    after = json.loads((out / "loraplex.json").read_text())
    assert after["reference"]["num_examples"] == 5 != before["reference"]["num_examples"]
    assert {k: v for k, v in after.items() if k != "reference"} == {k: v for k, v in before.items() if k != "reference"}

    merged = tmp_path / "merged"
    main(["export", str(out), "--merge", "--output", str(merged), "--format", "onnx"])
    printed = capsys.readouterr().out
    worst = float(printed.rsplit("max abs logit difference vs torch: ", 1)[1].split()[0])
    assert worst <= 1e-3 and (merged / ONNX_FILE).is_file()
    ids = torch.tensor([[1, 520, 33, 4012, 9, 77]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), out).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, peft(ids).logits, atol=1e-4, rtol=1e-4)


def _bad_cases(tmp_path: Path, tiny_base: Path) -> dict[str, tuple[list[str], str]]:
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_records(8))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"instruction": "a", "answer": "b"}])
    base = ["--base-model", str(tiny_base), "--output-dir", str(tmp_path / "out")]
    return {
        "malformed line": ([*base, "--datasets", f"{broken}:alpaca"], f"{broken}:2: malformed JSONL line"),
        "empty dataset": ([*base, "--datasets", f"{empty}:alpaca"], "holds no records"),
        "unknown format": ([*base, "--datasets", f"{good}:sharegpt"], "unknown dataset format 'sharegpt'"),
        "missing field": ([*base, "--datasets", f"{missing}:alpaca"], "field 'output' is missing"),
        "unloadable base": (
            [
                "--base-model",
                str(tmp_path / "nowhere"),
                "--datasets",
                f"{good}:alpaca",
                "--output-dir",
                str(tmp_path / "out"),
            ],
            "cannot load base_model",
        ),
        "bad target module": (
            [*base, "--datasets", f"{good}:alpaca", "--target-modules", "q_proj,embed_tokens"],
            "unsupported target module(s) ['embed_tokens']",
        ),
        "all too long": (
            [*base, "--datasets", f"{good}:alpaca", "--max-length", "8", "--overlong", "drop"],
            "training examples were dropped",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "malformed line",
        "empty dataset",
        "unknown format",
        "missing field",
        "unloadable base",
        "bad target module",
        "all too long",
    ],
)
def test_bad_input_fails_before_training(
    case: str, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, message = _bad_cases(tmp_path, tiny_base)[case]
    with pytest.raises(SystemExit) as exited:
        main(["train", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was trained or written
