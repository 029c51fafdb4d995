"""loraplex: one base LLM, many LoRA adapters, one batched forward pass."""

__version__ = "0.1.0"
