"""A base model's fingerprint: what an adapter records at training time so a server can refuse a foreign base.

It hashes the architecture shape, the tokenizer's vocabulary and a sample of the (unquantized) token embedding, so
the same base loaded in float32 or nf4 shares one fingerprint while a different base of the same size does not.
Trainer and server both call :func:`base_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from loraplex.server.core.shape import ModelShape

_EMBEDDING_ROWS = 64


def base_fingerprint(shape: ModelShape, tokenizer: Any, embedding: torch.Tensor) -> str:
    """``sha256:<hex>`` over shape, vocabulary and the first rows of the input embedding."""
    digest = hashlib.sha256()
    digest.update(json.dumps(shape.as_dict(), sort_keys=True).encode())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    sample = embedding[:_EMBEDDING_ROWS].detach().to("cpu", torch.float32).contiguous()
    # Rounded so that float32/bfloat16 loads of one base agree.
    digest.update(torch.round(sample.to(torch.bfloat16).float() * 1024).to(torch.int32).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"
