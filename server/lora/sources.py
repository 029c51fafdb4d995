"""Adapter sources: adapter ids are names resolved under the configured adapter roots, never paths.

An id is one or more ``/``-separated segments of letters, digits, ``.``, ``_`` and ``-`` (``support-v2``,
``acme/tickets``), none of them ``.`` or ``..``. The resolved directory must stay inside its root after symlinks
are followed, so a link cannot smuggle in a directory from elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.lora.format import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_ID_LENGTH = 256
MAX_ID_DEPTH = 4


class InvalidAdapterId(ValueError):
    """The id is not a valid adapter name; the message says what is allowed."""


class AdapterOutsideRoot(ValueError):
    """The id resolves (through a symlink) to a directory outside its adapter root."""


class AdapterDirectoryMissing(LookupError):
    """No adapter directory with this id exists under any adapter root."""


def files_signature(directory: Path) -> tuple[int, ...]:
    """What identifies the state of an adapter directory's files without reading them: mtime, size and inode of
    each (-1s for a missing one). A changed signature means the files must be read again."""
    parts: list[int] = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        try:
            stat = (directory / name).stat()
            parts += [stat.st_mtime_ns, stat.st_size, stat.st_ino]
        except OSError:
            parts += [-1, -1, -1]
    return tuple(parts)


@dataclass(frozen=True)
class StoreCost:
    """What fetching an adapter from its root costs beyond reading local files: an emulated remote store's latency
    and bandwidth (``adapters.fetch_latency_ms`` / ``fetch_bytes_per_s``, a test and benchmark knob), so a host-cache
    miss costs what it costs in production. The default costs nothing."""

    latency_s: float = 0.0
    bytes_per_s: int = 0  # 0: no bandwidth limit

    def wait_s(self, directory: Path) -> float:
        """How long fetching the adapter in ``directory`` waits before its files are read."""
        if not self.bytes_per_s:
            return self.latency_s
        try:
            size = (directory / WEIGHTS_FILE).stat().st_size
        except OSError:
            size = 0  # the read that follows reports the missing file
        return self.latency_s + size / self.bytes_per_s


def validate_adapter_id(adapter_id: str) -> str:
    if not adapter_id or len(adapter_id) > MAX_ID_LENGTH:
        raise InvalidAdapterId(f"adapter id must be 1 to {MAX_ID_LENGTH} characters")
    segments = adapter_id.split("/")
    if len(segments) > MAX_ID_DEPTH:
        raise InvalidAdapterId(f"adapter id '{adapter_id}' has more than {MAX_ID_DEPTH} '/'-separated parts")
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.match(segment):
            raise InvalidAdapterId(
                f"adapter id '{adapter_id}' is not a name: use letters, digits, '.', '_' and '-' in '/'-separated "
                "parts, each starting with a letter or digit (no absolute paths, no '..')"
            )
    return adapter_id


@dataclass(frozen=True)
class AdapterRoots:
    roots: tuple[Path, ...]

    @classmethod
    def of(cls, roots: Sequence[Path]) -> AdapterRoots:
        return cls(tuple(Path(root).expanduser().resolve() for root in roots))

    def resolve(self, adapter_id: str) -> Path:
        """The directory of ``adapter_id`` under the first root that has it."""
        validate_adapter_id(adapter_id)
        for root in self.roots:
            candidate = root / adapter_id
            try:
                real = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if not real.is_relative_to(root):
                raise AdapterOutsideRoot(
                    f"adapter '{adapter_id}' resolves outside its adapter root {root} (through a symlink); "
                    "copy the adapter under the root instead"
                )
            if real.is_dir():
                return real
        searched = ", ".join(str(root) for root in self.roots) or "(no adapter roots configured)"
        raise AdapterDirectoryMissing(f"adapter '{adapter_id}' not found under {searched}")

    def discover(self) -> Iterator[str]:
        """Ids of every adapter directory (one holding adapter_config.json) under the roots."""
        seen: set[str] = set()
        for root in self.roots:
            if not root.is_dir():
                continue
            for config in sorted(root.rglob(CONFIG_FILE)):
                adapter_id = config.parent.relative_to(root).as_posix()
                try:
                    validate_adapter_id(adapter_id)
                except InvalidAdapterId:
                    continue
                if adapter_id not in seen:
                    seen.add(adapter_id)
                    yield adapter_id
