"""Chat templates and completion-only masking: prompt tokens carry -100, completions are trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraplex.server.core.types import ChatMessage
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.data import prepare_data
from loraplex.trainer.encode import IGNORE, Encoder
from loraplex.trainer.errors import DataError
from loraplex.trainer.formats import ChatExample, TextExample
from tests.unit.trainer.tiny import write_jsonl

CHAT = ChatExample(
    (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Name a colour."),
        ChatMessage("assistant", "Blue"),
        ChatMessage("user", "Another?"),
        ChatMessage("assistant", "Red"),
    )
)


def _trained_text(tokenizer: Any, ids: tuple[int, ...], labels: tuple[int, ...]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])


def test_chat_trains_only_assistant_turns(tokenizer: Any) -> None:
    encoded = Encoder(tokenizer).encode(CHAT)
    full = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in CHAT.messages], tokenize=False
    )
    assert tokenizer.decode(encoded.input_ids) == full
    assert _trained_text(tokenizer, encoded.input_ids, encoded.labels) == "Blue<|im_end|>\nRed<|im_end|>\n"
    assert encoded.labels[0] == IGNORE
    trained = [label for label in encoded.labels if label != IGNORE]
    assert encoded.num_targets == len(trained)


def test_prompt_ids_match_the_servers_tokenization(tokenizer: Any) -> None:
    """The server tokenizes chat requests as template(add_generation_prompt=True) without special tokens."""
    encoder = Encoder(tokenizer)
    single = ChatExample((ChatMessage("user", "Name a colour."), ChatMessage("assistant", "Blue")))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=False
    )
    served = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoder.prompt_ids(single) == served
    encoded = encoder.encode(single)
    assert list(encoded.input_ids[: len(served)]) == served  # training sees the same prompt ids
    assert all(label == IGNORE for label in encoded.labels[: len(served)])
    # What the server generates and counts: the answer and its end token, not the template's newline after it.
    completion = encoder.completion_ids(single)
    assert completion == list(encoded.input_ids[len(served) : len(served) + len(completion)])
    assert tokenizer.decode(completion) == "Blue<|im_end|>"
    assert completion[-1] == tokenizer.eos_token_id


def test_prompt_completion_masks_prompt_and_ends_with_eos(tokenizer: Any) -> None:
    encoded = Encoder(tokenizer).encode(TextExample("Q: 2+2=", " 4"))
    assert _trained_text(tokenizer, encoded.input_ids, encoded.labels) == " 4<|im_end|>"
    assert encoded.input_ids[-1] == tokenizer.eos_token_id


def test_text_and_train_on_prompt_train_everything_but_the_first(tokenizer: Any) -> None:
    for encoded in (
        Encoder(tokenizer).encode(TextExample("", "all of it")),
        Encoder(tokenizer, train_on_prompt=True).encode(CHAT),
    ):
        assert encoded.labels[0] == IGNORE
        assert list(encoded.labels[1:]) == list(encoded.input_ids[1:])


def test_no_chat_template_is_a_clear_error(tokenizer: Any) -> None:
    class Plain:
        chat_template = None
        eos_token_id = 2

    with pytest.raises(DataError, match="no chat template; use the prompt_completion format"):
        Encoder(Plain()).encode(CHAT)


@pytest.mark.parametrize(("overlong", "truncated", "dropped", "kept"), [("truncate", 1, 1, 4), ("drop", 0, 2, 3)])
def test_overlong_examples_are_counted(
    tmp_path: Path, tokenizer: Any, overlong: str, truncated: int, dropped: int, kept: int
) -> None:
    long_input = "word " * 200
    records = [
        {"instruction": "Say yes.", "output": "yes"},
        {"instruction": "Say no.", "output": "no"},
        {"instruction": "Say ok.", "output": "ok"},
        {"instruction": "Repeat.", "output": long_input},  # prompt fits, completion is cut: truncated
        {"instruction": long_input, "output": "x"},  # the prompt alone is too long: nothing left to train
    ]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    config = TrainConfig(datasets=({"path": path, "format": "alpaca"},), max_length=64, val_size=0, overlong=overlong)  # type: ignore[arg-type]
    data = prepare_data(config, tokenizer)
    assert (data.report.truncated, data.report.dropped, data.report.train_examples) == (truncated, dropped, kept)
    assert all(len(row.input_ids) <= 64 for row in data.train_rows)
    assert f"{truncated} truncated, {dropped} dropped" in data.report.describe()


def test_everything_dropped_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "word " * 100, "output": "x"}] * 3)
    config = TrainConfig(datasets=({"path": path, "format": "alpaca"},), max_length=16, val_size=0)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="all 3 training examples were dropped"):
        prepare_data(config, tokenizer)


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"instruction": f"Echo {i}", "output": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    config = TrainConfig(datasets=({"path": path, "format": "alpaca"},), val_size=0.25)  # type: ignore[arg-type]
    first, second = prepare_data(config, tokenizer), prepare_data(config, tokenizer)
    assert first.val_examples == second.val_examples and len(first.val_examples) == 5
    assert first.report.train_examples == 15
    too_big = config.model_copy(update={"val_size": 20})
    with pytest.raises(DataError, match="leaving none to train on"):
        prepare_data(too_big, tokenizer)
