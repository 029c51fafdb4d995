"""Replacing an adapter on disk the way a deployment does: new weights written beside the old file, then renamed
over it (atomic), so the server's next LoadAdapter sees changed files and serves a new version."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.numpy import load_file, save_file

# PEFT's weights file (loraplex.server.lora.format.WEIGHTS_FILE): not imported from there, since that module loads
# torch, which would add seconds to the start of every Locust process.
WEIGHTS_FILE = "adapter_model.safetensors"


def rewrite_weights(directory: Path, factor: float) -> None:
    """Scales every ``lora_B`` tensor of the adapter in ``directory`` by ``factor`` (same shapes and dtypes, new
    content hash) and swaps the file in atomically."""
    path = directory / WEIGHTS_FILE
    tensors = load_file(str(path))
    scaled = {
        name: (value * factor).astype(value.dtype) if "lora_B" in name else value for name, value in tensors.items()
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(scaled, str(temporary))
    os.replace(temporary, path)
