"""The engine: request state, continuous-batching scheduler, KV cache, sampler, detokenizer and the engine loop."""
