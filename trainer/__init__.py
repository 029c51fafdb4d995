"""loraplex-train: fine-tunes LoRA adapters that the loraplex server serves as-is."""
