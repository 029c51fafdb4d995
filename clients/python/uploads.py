"""Adapter uploads: the files of a local adapter directory as the message stream of ``Adapters.UploadAdapter``.

Only the files a server serves are sent (adapter_config.json, adapter_model.safetensors and, when present, the
loraplex.json manifest); checkpoints, reports and plots a trainer leaves beside them stay behind. ``UploadChunks``
can be iterated more than once, so a retried call sends the whole directory again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from loraplex.proto.v1 import adapters_pb2

UPLOADED_FILES = ("adapter_config.json", "adapter_model.safetensors", "loraplex.json")
REQUIRED_FILES = UPLOADED_FILES[:2]
CHUNK_BYTES = 1 << 20  # well under the server's default 4 MiB message limit


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


class UploadChunks:
    """The UploadAdapter messages of ``directory`` under ``adapter_id``: the header, then the files' bytes."""

    def __init__(self, directory: Path, adapter_id: str, pin: bool | None = None) -> None:
        directory = Path(directory)
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: {', '.join(missing)} missing")
        self._paths = [directory / name for name in UPLOADED_FILES if (directory / name).is_file()]
        self._header = adapters_pb2.UploadAdapterHeader(
            adapter_id=adapter_id,
            files=[
                adapters_pb2.UploadedFile(name=path.name, size_bytes=path.stat().st_size, sha256=_sha256(path))
                for path in self._paths
            ],
        )
        if pin is not None:
            self._header.pin = pin

    @property
    def size_bytes(self) -> int:
        return sum(file.size_bytes for file in self._header.files)

    def __iter__(self) -> Iterator[adapters_pb2.UploadAdapterChunk]:
        yield adapters_pb2.UploadAdapterChunk(header=self._header)
        for path in self._paths:
            with path.open("rb") as handle:
                while block := handle.read(CHUNK_BYTES):
                    yield adapters_pb2.UploadAdapterChunk(data=block)
