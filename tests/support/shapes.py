"""The tiny model shape of the unit tests that need no real model: 2 layers of 64 wide, 4 query and 2 KV heads."""

from __future__ import annotations

from loraplex.server.core.shape import ModelShape

TINY_SHAPE = ModelShape(
    "llama",
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=100,
)
