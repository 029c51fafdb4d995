"""Structured output: compiles a :class:`Constraint` into a grammar matcher and fills per-row token masks.

Built on llguidance (chosen by measured mask cost and footprint, loadtests/BENCHMARKS.md). A spec is turned into
an llguidance grammar and validated on the submitting thread (an uncompilable one is an ``InvalidRequest`` naming
the problem); the grammar text is cached by spec (bounded, LRU). Each constrained sequence owns a
:class:`TokenMatcher`, advanced with every sampled token; per step the sampler asks :func:`allowed_tokens` for one
bool ``[rows, vocab]`` mask, filled only for the constrained rows. EOS is
allowed exactly when the grammar accepts; a matcher that can take nothing but EOS is complete.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.types import Constraint, ConstraintKind

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_CACHED_GRAMMARS = 256  # compiled (validated) grammar texts kept, keyed by spec
_MAX_SPEC_CHARS = 64 * 1024
# Compact JSON (no free whitespace between tokens): a small model cannot spend its tokens on blank lines. A schema's
# own "x-guidance" options override it.
_JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}


class TokenMatcher:
    """One sequence's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Consumes a sampled token; False when the grammar refused it (the matcher is then in error)."""
        return self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The grammar accepts the output and allows nothing more but EOS."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class ConstraintCompiler:
    """Turns specs into matchers for one tokenizer; thread-safe (llguidance's objects release the GIL)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self._grammar = lru_cache(maxsize=_CACHED_GRAMMARS)(self._compile)

    def matcher(self, constraint: Constraint) -> TokenMatcher:
        """A fresh matcher for ``constraint``; raises InvalidRequest when it does not compile."""
        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar(constraint), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the {constraint.kind} constraint does not compile: {matcher.get_error()}")
        return TokenMatcher(matcher)

    def _compile(self, constraint: Constraint) -> str:
        kind, text = constraint.kind, constraint.text
        if len(text) > _MAX_SPEC_CHARS:
            raise InvalidRequest(f"the {kind} constraint is longer than {_MAX_SPEC_CHARS} characters")
        try:
            if kind is ConstraintKind.JSON_SCHEMA:
                schema = json.loads(text)
                if not isinstance(schema, dict | bool):
                    raise InvalidRequest("the json_schema constraint must be a JSON object (a schema)")
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_DEFAULTS)
            elif kind is ConstraintKind.JSON_OBJECT:
                grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
            elif kind is ConstraintKind.REGEX:
                grammar = llguidance.LLMatcher.grammar_from_regex(text)
            else:
                grammar = llguidance.grammar_from("grammar", text)
        except ValueError as exc:  # json.JSONDecodeError included
            raise InvalidRequest(f"the {kind} constraint is malformed: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise InvalidRequest(f"the {kind} constraint does not compile: {'; '.join(messages)}")
        return grammar


def allowed_tokens(matchers: list[TokenMatcher | None], vocab: int, device: torch.device) -> torch.Tensor:
    """Bool ``[rows, vocab]`` on ``device``: the tokens each row may take (every token for rows without one).

    Rows are filled one after the other (tens of microseconds each; llguidance's thread pool cost 4-40 ms a step for
    32 rows on a busy 2-core CPU) and the bits unpacked by numpy (bit j of word w is token 32·w + j: the
    little-endian bytes in order, each from its lowest bit), where the shift-and-mask in torch took about 45 ms."""
    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), vocab)  # all bits set: all allowed
    for row, m in enumerate(matchers):
        if m is not None:
            llguidance.torch.fill_next_token_bitmask(m.matcher, bitmask, row)
    words = bitmask.numpy().astype("<i4", copy=False)  # little-endian words (a no-op on x86 and ARM)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(bits).view(torch.bool).to(device, non_blocking=True)
