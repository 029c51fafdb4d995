"""Adapter uploads on disk (server/lora/upload.py): staged, checked file by file, installed whole, rolled back, and
refused cleanly when the upload root is full (a real 64 KiB tmpfs, when this process may mount one)."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.server.lora.format import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from loraplex.server.lora.sources import AdapterRoots
from loraplex.server.lora.upload import (
    STAGING_DIR,
    AdapterUpload,
    InvalidUpload,
    UploadConflict,
    UploadedFile,
    UploadStorageFull,
    upload_target,
)

CONFIG, WEIGHTS = b'{"peft_type": "LORA"}', bytes(range(256)) * 40


def _file(name: str, data: bytes) -> UploadedFile:
    return UploadedFile(name, len(data), hashlib.sha256(data).hexdigest())


def _upload(root: Path, adapter_id: str, *files: tuple[str, bytes]) -> AdapterUpload:
    target = upload_target(AdapterRoots.of([root]), root, adapter_id)
    return AdapterUpload(target, root, [_file(name, data) for name, data in files], max_weights_bytes=1 << 20)


def test_bytes_split_anywhere_install_whole_files_and_empty_files_count(tmp_path: Path) -> None:
    upload = _upload(tmp_path, "team/a", (CONFIG_FILE, CONFIG), (MANIFEST_FILE, b""), (WEIGHTS_FILE, WEIGHTS))
    stream = CONFIG + WEIGHTS
    for start in range(0, len(stream), 333):  # chunks that straddle file boundaries
        upload.write(stream[start : start + 333])
    installed = upload.install()
    installed.commit()
    directory = tmp_path / "team" / "a"
    assert installed.target == directory
    contents = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert contents == {CONFIG_FILE: CONFIG, MANIFEST_FILE: b"", WEIGHTS_FILE: WEIGHTS}
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


def test_a_replaced_adapter_waits_aside_and_rollback_restores_it(tmp_path: Path) -> None:
    first = _upload(tmp_path, "a", (CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS))
    first.write(CONFIG + WEIGHTS)
    first.install().commit()
    second = _upload(tmp_path, "a", (CONFIG_FILE, CONFIG), (WEIGHTS_FILE, b"new weights"))
    second.write(CONFIG + b"new weights")
    installed = second.install()
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == b"new weights"
    installed.rollback()
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ([(CONFIG_FILE, CONFIG)], f"the upload lacks {WEIGHTS_FILE}"),
        ([(CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS), ("adapter_model.bin", b"x")], "'adapter_model.bin' is not"),
        ([(CONFIG_FILE, CONFIG), (CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS)], "a file is listed twice"),
        ([(CONFIG_FILE, CONFIG), (WEIGHTS_FILE, b"w" * ((1 << 20) + 1))], "over the limit of 1048576"),
    ],
)
def test_file_lists_that_are_no_adapter_are_refused_before_writing(
    tmp_path: Path, files: list[tuple[str, bytes]], says: str
) -> None:
    with pytest.raises(InvalidUpload, match=says):
        _upload(tmp_path, "a", *files)
    assert not (tmp_path / STAGING_DIR).exists()


def test_bad_digests_ids_and_roots_are_refused(tmp_path: Path) -> None:
    target = upload_target(AdapterRoots.of([tmp_path]), tmp_path, "a")
    with pytest.raises(InvalidUpload, match="64 lowercase hex digits"):
        AdapterUpload(target, tmp_path, [UploadedFile(CONFIG_FILE, 1, "ABC"), _file(WEIGHTS_FILE, WEIGHTS)], 1 << 20)
    with pytest.raises(InvalidUpload, match="is not a name"):
        upload_target(AdapterRoots.of([tmp_path]), tmp_path, "a/../b")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "team").symlink_to(outside)
    with pytest.raises(InvalidUpload, match="outside the upload root"):
        upload_target(AdapterRoots.of([tmp_path / "root"]), tmp_path / "root", "team/a")
    front = tmp_path / "front"
    (front / "a").mkdir(parents=True)
    (front / "a" / CONFIG_FILE).write_bytes(CONFIG)
    with pytest.raises(UploadConflict, match="searched before the upload root"):
        upload_target(AdapterRoots.of([front, tmp_path / "root"]), tmp_path / "root", "a")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that runs out of space."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_is_resource_exhausted_and_the_staging_is_removed(full_disk: Path) -> None:
    weights = b"w" * (256 << 10)
    upload = _upload(full_disk, "a", (CONFIG_FILE, CONFIG), (WEIGHTS_FILE, weights))
    with pytest.raises(UploadStorageFull, match="no space left on the upload root while writing"):
        upload.write(CONFIG + weights)
    upload.abort()
    assert list((full_disk / STAGING_DIR).iterdir()) == []
    assert not (full_disk / "a").exists()
