"""Trainer integration-test fixtures (defined in ``tests.unit.trainer.tiny``)."""

from tests.unit.trainer.tiny import tiny_base, tokenizer

__all__ = ["tiny_base", "tokenizer"]
