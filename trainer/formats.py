"""Dataset files and formats: JSON or JSONL records → :class:`ChatExample` / :class:`TextExample`.

Formats (the names LLaMA-Factory and TRL use):

- ``alpaca``: ``instruction``, optional ``input`` (joined to the instruction by a newline), ``output``, optional
  ``system`` → a chat of system?, user, assistant;
- ``chat``: ``messages`` = ``[{role, content}, ...]`` with roles system/user/assistant/tool; loss on assistant turns;
- ``prompt_completion``: ``prompt``, ``completion``: raw text, no chat template;
- ``text``: ``text``: raw text, every token trained.

Every problem names the file and the 1-based line (JSONL) or record index (JSON array) and the field to fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.server.core.types import ChatMessage
from loraplex.server.engine.engine import CHAT_ROLES
from loraplex.trainer.config import DatasetSpec
from loraplex.trainer.errors import DataError


@dataclass(frozen=True)
class ChatExample:
    """A conversation rendered with the tokenizer's chat template; assistant turns are the completions."""

    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True)
class TextExample:
    """Raw text: ``prompt`` (masked unless train_on_prompt; empty for the text format) then ``completion``."""

    prompt: str
    completion: str


Example = ChatExample | TextExample


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a JSON array file or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"dataset file {path} does not exist; check the path in datasets") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read dataset file {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from exc
        for index, record in enumerate(data):
            yield f"{path} record {index}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: malformed JSONL line ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from exc
        yield f"{path}:{number}", record


def _text(record: dict[str, Any], key: str, where: str, fmt: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field '{key}' is {found}; the {fmt} format needs it (keys: {sorted(record)})")
    return value


def _alpaca(record: dict[str, Any], where: str) -> Example:
    instruction = _text(record, "instruction", where, "alpaca")
    extra = _text(record, "input", where, "alpaca", required=False)
    system = _text(record, "system", where, "alpaca", required=False)
    turns = [ChatMessage("system", system)] if system else []
    turns.append(ChatMessage("user", f"{instruction}\n{extra}" if extra else instruction))
    turns.append(ChatMessage("assistant", _text(record, "output", where, "alpaca")))
    return ChatExample(tuple(turns))


def _chat(record: dict[str, Any], where: str) -> Example:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        role = _text(message, "role", f"{where} messages[{index}]", "chat")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{index}] has role '{role}'; use one of {', '.join(sorted(CHAT_ROLES))}")
        turns.append(ChatMessage(role, _text(message, "content", f"{where} messages[{index}]", "chat")))
    if not any(turn.role == "assistant" for turn in turns):
        raise DataError(f"{where}: no assistant message; chat examples train on assistant turns, add one")
    return ChatExample(tuple(turns))


def _prompt_completion(record: dict[str, Any], where: str) -> Example:
    return TextExample(
        _text(record, "prompt", where, "prompt_completion"), _text(record, "completion", where, "prompt_completion")
    )


def _plain(record: dict[str, Any], where: str) -> Example:
    return TextExample("", _text(record, "text", where, "text"))


_PARSERS = {"alpaca": _alpaca, "chat": _chat, "prompt_completion": _prompt_completion, "text": _plain}


def read_dataset(spec: DatasetSpec) -> list[Example]:
    """All examples of one file; raises :class:`DataError` at the first bad record, or if there are none."""
    parse = _PARSERS[spec.format]
    examples = []
    for where, record in _records(spec.path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
        examples.append(parse(record, where))
    if not examples:
        raise DataError(f"dataset file {spec.path} holds no records; add examples or remove it from the config")
    return examples


def dataset_hash(specs: tuple[DatasetSpec, ...]) -> str:
    """``sha256:<hex>`` over the format and bytes of each file, in order."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(spec.format.encode() + b"\0")
        digest.update(spec.path.read_bytes())
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()}"
