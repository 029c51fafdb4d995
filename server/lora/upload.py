"""Uploaded adapters: an adapter directory received over the network, written under the upload root whole or not at
all.

An upload is staged in ``<upload root>/.uploads/`` (hidden: no adapter id starts with ``.``), each file checked
against the header as its bytes arrive (name, size, SHA-256), then renamed into place. A directory already there
under the same id is moved aside, not deleted, until the caller knows whether the new adapter loads: ``commit``
drops the old one, ``rollback`` puts it back, so a rejected upload leaves the previous adapter as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loraplex.server.lora.format import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from loraplex.server.lora.sources import (
    AdapterDirectoryMissing,
    AdapterOutsideRoot,
    AdapterRoots,
    InvalidAdapterId,
    validate_adapter_id,
)

STAGING_DIR = ".uploads"
ALLOWED_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MAX_METADATA_BYTES = 64 << 20  # adapter_config.json and loraplex.json
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UploadError(Exception):
    """Base of the upload failures; ``str(error)`` says what to fix."""


class InvalidUpload(UploadError):
    """The header or the bytes do not describe an adapter directory we accept."""


class UploadConflict(UploadError):
    """Another upload of the same adapter id is running, or the id is served from an earlier root."""


class UploadStorageFull(UploadError):
    """The upload root ran out of space."""


class UploadStorageFailed(UploadError):
    """The upload root cannot be written (permissions, read-only file system, ...)."""


@dataclass(frozen=True)
class UploadedFile:
    name: str
    size: int
    sha256: str


def _storage_error(action: str, error: OSError) -> UploadError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UploadStorageFull(f"no space left on the upload root while {action}; free disk space and upload again")
    return UploadStorageFailed(f"cannot write the upload root while {action} ({error.strerror or error}); check it")


def check_files(files: Sequence[UploadedFile], max_weights_bytes: int) -> None:
    """Refuses a file list that is not an adapter directory we accept, before any byte is written."""
    names = [file.name for file in files]
    for file in files:
        if file.name not in ALLOWED_FILES:
            allowed = ", ".join(ALLOWED_FILES)
            raise InvalidUpload(f"file '{file.name}' is not part of an adapter upload; send only {allowed}")
        limit = max_weights_bytes if file.name == WEIGHTS_FILE else MAX_METADATA_BYTES
        if file.size > limit:
            raise InvalidUpload(
                f"{file.name} is {file.size} bytes, over the limit of {limit}; "
                + ("raise adapters.max_file_bytes or use a smaller rank" if file.name == WEIGHTS_FILE else "trim it")
            )
        if not _SHA256.match(file.sha256):
            raise InvalidUpload(f"the sha256 of {file.name} must be 64 lowercase hex digits")
    if len(set(names)) != len(names):
        raise InvalidUpload("a file is listed twice in the upload header")
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise InvalidUpload(f"the upload lacks {', '.join(missing)}; a PEFT LoRA adapter directory needs both files")


def upload_target(roots: AdapterRoots, upload_root: Path, adapter_id: str) -> Path:
    """Where ``adapter_id`` lands under ``upload_root``; refuses ids that resolve elsewhere or escape the root."""
    root = upload_root.expanduser().resolve()
    try:
        validate_adapter_id(adapter_id)
        serving: Path | None = roots.resolve(adapter_id)
    except (InvalidAdapterId, AdapterOutsideRoot) as error:
        raise InvalidUpload(str(error)) from error
    except AdapterDirectoryMissing:
        serving = None
    if serving is not None and not serving.is_relative_to(root):
        raise UploadConflict(
            f"adapter '{adapter_id}' is served from {serving}, an adapter root searched before the upload root "
            f"{root}; remove it there or upload under another id"
        )
    target = root / adapter_id
    if not target.parent.resolve().is_relative_to(root):
        raise InvalidUpload(f"adapter '{adapter_id}' would land outside the upload root {root} (through a symlink)")
    return target


class Installed:
    """An uploaded adapter in place; the directory it replaced (if any) waits aside for ``commit`` or ``rollback``."""

    def __init__(self, target: Path, previous: Path | None) -> None:
        self.target = target
        self._previous = previous

    def commit(self) -> None:
        if self._previous is not None:
            shutil.rmtree(self._previous, ignore_errors=True)

    def rollback(self) -> None:
        shutil.rmtree(self.target, ignore_errors=True)
        if self._previous is not None:
            os.replace(self._previous, self.target)


class AdapterUpload:
    """One upload in progress: ``write`` its bytes in header order, then ``install`` (or ``abort``)."""

    def __init__(self, target: Path, upload_root: Path, files: Sequence[UploadedFile], max_weights_bytes: int) -> None:
        check_files(files, max_weights_bytes)
        self._target = target
        self._files = list(files)
        self._staging_root = upload_root.expanduser().resolve() / STAGING_DIR
        self._staging = self._staging_root / uuid.uuid4().hex
        try:
            self._staging.mkdir(parents=True)
        except OSError as error:
            raise _storage_error("creating the staging directory", error) from error
        self._index = 0
        self._written = 0
        self._hash = hashlib.sha256()
        self._handle: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        """Appends ``data`` to the files in order, checking each file's size and digest as it completes."""
        view = memoryview(data)
        while view:
            self._skip_empty_files()
            if self._index >= len(self._files):
                raise InvalidUpload("more bytes arrived than the header's file sizes add up to; resend the upload")
            file = self._files[self._index]
            take = min(len(view), file.size - self._written)
            handle = self._open_current()
            try:
                handle.write(view[:take])
            except OSError as error:
                raise _storage_error(f"writing {file.name}", error) from error
            self._hash.update(view[:take])
            self._written += take
            view = view[take:]
            self._finish_file_if_complete()

    def install(self) -> Installed:
        """Checks that every file arrived whole, then renames the staged directory to the adapter's place."""
        self._skip_empty_files()
        if self._index < len(self._files):
            file = self._files[self._index]
            raise InvalidUpload(
                f"the upload ended inside {file.name} ({self._written} of {file.size} bytes); resend the upload"
            )
        previous: Path | None = None
        try:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            if self._target.exists() or self._target.is_symlink():
                previous = self._staging_root / f"{self._staging.name}-previous"
                os.replace(self._target, previous)
            os.replace(self._staging, self._target)
        except OSError as error:
            if previous is not None and not self._target.exists():
                os.replace(previous, self._target)
            raise _storage_error("moving the upload into place", error) from error
        return Installed(self._target, previous)

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        shutil.rmtree(self._staging, ignore_errors=True)

    def _open_current(self) -> BinaryIO:
        if self._handle is None:
            try:
                self._handle = (self._staging / self._files[self._index].name).open("wb")
            except OSError as error:
                raise _storage_error(f"creating {self._files[self._index].name}", error) from error
        return self._handle

    def _skip_empty_files(self) -> None:
        while self._index < len(self._files) and self._files[self._index].size == self._written:
            self._open_current()
            self._finish_file_if_complete()

    def _finish_file_if_complete(self) -> None:
        file = self._files[self._index]
        if self._written < file.size:
            return
        assert self._handle is not None
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise _storage_error(f"writing {file.name}", error) from error
        finally:
            self._handle.close()
            self._handle = None
        if self._hash.hexdigest() != file.sha256:
            raise InvalidUpload(f"{file.name} arrived damaged: its SHA-256 differs from the header's; resend it")
        self._index += 1
        self._written = 0
        self._hash = hashlib.sha256()
