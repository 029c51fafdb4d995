"""Examples → token ids and labels: chat templates from the tokenizer, completion-only masking.

A chat is cut into segments at each assistant turn: the template rendered up to the turn with the generation
prompt (masked) and the turn itself up to the template's end-of-turn (trained). Each segment is tokenized on its
own, so the first prompt's ids are exactly what the server tokenizes for the same messages (template with
``add_generation_prompt=True``, no extra special tokens). Raw text (prompt_completion, text) is tokenized like the
server's plain prompts (with the tokenizer's special tokens) and the completion ends with EOS.

Masked positions carry :data:`IGNORE` (-100). The first label of every example is always masked: nothing
predicts it, which also keeps packed examples from learning across their boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.server.core.types import ChatMessage
from loraplex.trainer.errors import DataError
from loraplex.trainer.formats import ChatExample, Example, TextExample

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example; ``labels[i]`` is the target at position i (shifting happens in the loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_targets(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)

    def truncated(self, max_length: int) -> Encoded:
        return Encoded(self.input_ids[:max_length], self.labels[:max_length])


class Encoder:
    """Tokenizes examples for one tokenizer; ``train_on_prompt`` trains on every token."""

    def __init__(self, tokenizer: Any, train_on_prompt: bool = False) -> None:
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        self.eos_id = int(tokenizer.eos_token_id)

    def _ids(self, text: str, special: bool = False) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return ids

    def render(self, turns: tuple[ChatMessage, ...], generation_prompt: bool) -> str:
        if self.tokenizer.chat_template is None:
            raise DataError("the base model's tokenizer has no chat template; use the prompt_completion format")
        text: str = self.tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in turns],
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
        return text

    def _chat_segments(self, example: ChatExample) -> list[tuple[list[int], bool]]:
        segments: list[tuple[list[int], bool]] = []
        done = ""
        for index, turn in enumerate(example.messages):
            if turn.role != "assistant":
                continue
            before = self.render(example.messages[:index], generation_prompt=True)
            after = self.render(example.messages[: index + 1], generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise DataError(
                    "the tokenizer's chat template does not render a conversation as a prefix of its continuation; "
                    "completion-only masking needs that (use the prompt_completion format instead)"
                )
            segments += [(self._ids(before[len(done) :]), False), (self._ids(after[len(before) :]), True)]
            done = after
        return segments

    def _text_segments(self, example: TextExample) -> list[tuple[list[int], bool]]:
        completion = [*self._ids(example.completion), self.eos_id]
        return [(self._ids(example.prompt, special=True), False), (completion, True)]

    def encode(self, example: Example) -> Encoded:
        segments = self._chat_segments(example) if isinstance(example, ChatExample) else self._text_segments(example)
        input_ids: list[int] = []
        labels: list[int] = []
        for ids, trained in segments:
            input_ids += ids
            labels += ids if trained or self.train_on_prompt else [IGNORE] * len(ids)
        if labels:
            labels[0] = IGNORE
        return Encoded(tuple(input_ids), tuple(labels))

    def prompt_ids(self, example: Example) -> list[int]:
        """The prompt of the example's last completion, tokenized as the server tokenizes a request."""
        if isinstance(example, TextExample):
            return self._ids(example.prompt, special=True)
        last = max(i for i, turn in enumerate(example.messages) if turn.role == "assistant")
        return self._ids(self.render(example.messages[:last], generation_prompt=True))

    def completion_ids(self, example: Example) -> list[int]:
        """The tokens of the last completion up to and including its end token: what a served model generates
        (the server stops at the end token, so template text after it, like a newline, is not part of it)."""
        ids = (
            self._text_segments(example)[1][0]
            if isinstance(example, TextExample)
            else self._chat_segments(example)[-1][0]
        )
        return ids[: ids.index(self.eos_id) + 1] if self.eos_id in ids else ids


def reference_text(example: Example) -> str:
    """The text a generation for the example's prompt is scored against."""
    if isinstance(example, TextExample):
        return example.completion
    return next(turn.content for turn in reversed(example.messages) if turn.role == "assistant")
