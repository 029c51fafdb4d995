"""Dataset formats and every bad-input case: file and line named, field named, clear fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.server.core.types import ChatMessage
from loraplex.trainer.config import DatasetSpec
from loraplex.trainer.errors import DataError
from loraplex.trainer.formats import ChatExample, TextExample, dataset_hash, read_dataset


def _file(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _read(path: Path, fmt: str) -> list[object]:
    return list(read_dataset(DatasetSpec(path=path, format=fmt)))


def test_each_format(tmp_path: Path) -> None:
    alpaca = _file(tmp_path, json.dumps({"instruction": "Add", "input": "1+1", "output": "2", "system": "Be terse"}))
    assert _read(alpaca, "alpaca") == [
        ChatExample((ChatMessage("system", "Be terse"), ChatMessage("user", "Add\n1+1"), ChatMessage("assistant", "2")))
    ]
    chat = _file(
        tmp_path, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    assert _read(chat, "chat") == [ChatExample((ChatMessage("user", "hi"), ChatMessage("assistant", "yo")))]
    array = _file(tmp_path, json.dumps([{"prompt": "2+2=", "completion": "4"}]), "data.json")
    assert _read(array, "prompt_completion") == [TextExample("2+2=", "4")]
    text = _file(tmp_path, json.dumps({"text": "plain"}) + "\n\n")
    assert _read(text, "text") == [TextExample("", "plain")]


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            "alpaca",
            r"data.jsonl:2: malformed JSONL line",
        ),
        ('{"instruction": "a"}\n', "alpaca", r"data.jsonl:1: field 'output' is missing; the alpaca format needs it"),
        ('{"instruction": 3, "output": "b"}\n', "alpaca", r"field 'instruction' is a int, not a string"),
        ('{"messages": []}\n', "chat", r"'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "chat", r"no assistant message"),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', "chat", r"role 'bot'"),
        ('{"prompt": "x"}\n', "prompt_completion", r"field 'completion' is missing"),
        ('{"content": "x"}\n', "text", r"field 'text' is missing"),
        ('["not", "an", "object"]\n', "text", r"record 0: a record must be a JSON object"),
        ("\n\n", "alpaca", r"holds no records"),
        ("", "alpaca", r"holds no records"),
    ],
)
def test_bad_records(tmp_path: Path, content: str, fmt: str, message: str) -> None:
    path = _file(tmp_path, content)
    with pytest.raises(DataError, match=message):
        _read(path, fmt)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _read(tmp_path / "nope.jsonl", "alpaca")


def test_hash_changes_with_content_and_format(tmp_path: Path) -> None:
    path = _file(tmp_path, '{"text": "a"}\n')
    first = dataset_hash((DatasetSpec(path=path, format="text"),))
    assert first == dataset_hash((DatasetSpec(path=path, format="text"),))
    assert first != dataset_hash((DatasetSpec(path=path, format="alpaca"),))
    path.write_text('{"text": "b"}\n')
    assert first != dataset_hash((DatasetSpec(path=path, format="text"),))
