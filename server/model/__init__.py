"""The base model: locate and convert (GGUF → safetensors cache), load (optionally quantized), batched forward."""
