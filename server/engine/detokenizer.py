"""Incremental, UTF-8-safe detokenization and stop-string handling for streaming.

:class:`IncrementalDetokenizer` turns one token at a time into text deltas. A token that ends inside a multi-byte
character decodes to U+FFFD; its text is held back until the character completes, so the concatenated deltas equal
the decoded whole. :class:`StopMatcher` holds back text that could still become a stop string and cuts the
output where one completes (the stop string itself is not returned).
"""

from __future__ import annotations

from typing import Any

_PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output so tokenizers see a word boundary


class IncrementalDetokenizer:
    def __init__(self, backend: Any, prompt_ids: list[int]) -> None:
        self._backend = backend  # a tokenizers.Tokenizer: decode() does not mutate it, so it is thread-safe
        self._tokens = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def _decode(self, tokens: list[int]) -> str:
        text: str = self._backend.decode(tokens, skip_special_tokens=True)
        return text

    def push(self, token: int) -> str:
        """Appends ``token``; returns the text it completes (possibly empty)."""
        self._tokens.append(token)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopMatcher:
    """Accumulates output text; emits what can no longer be part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Adds ``delta``; returns the newly safe text. Sets ``stopped`` when a stop string completes."""
        if self.stopped:
            return ""
        self.text += delta
        if not self._stops:
            out = self.text[self._emitted :]
            self._emitted = len(self.text)
            return out
        search_from = max(0, self._emitted - self._longest)
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self._emitted : cut]
            self.text = self.text[:cut]
            self._emitted = cut
            self.stopped = True
            return out
        safe = len(self.text)
        for keep in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-keep:]
            if any(s.startswith(tail) for s in self._stops):
                safe = len(self.text) - keep
                break
        safe = max(safe, self._emitted)
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out

    def flush(self) -> str:
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out
