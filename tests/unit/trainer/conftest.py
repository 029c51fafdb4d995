"""Trainer unit-test fixtures (shared with the integration tests through ``tiny``)."""

from tests.unit.trainer.tiny import tiny_base, tokenizer

__all__ = ["tiny_base", "tokenizer"]
