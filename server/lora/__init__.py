"""LoRA adapters: the PEFT format, adapter sources, the two-tier cache, device slot pools and the batched math."""
