"""Synthetic PEFT adapters for tests: the package's writer, re-exported under the name the tests use."""

from loraplex.server.lora.synthetic import ALL_LINEAR, QV, write_adapter

__all__ = ["ALL_LINEAR", "QV", "write_adapter"]
