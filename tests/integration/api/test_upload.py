"""Adapter upload (``Adapters.UploadAdapter``, ``loraplex-train push``, ``loraplex adapters upload``) against a real
server with two adapter roots: a front root searched first and the upload root behind it.

An uploaded adapter must serve exactly what the same files serve when placed on the server's disk by hand; a
replacement becomes a new version; a rejected or damaged upload leaves the previous adapter and the disk as they
were, with the status code and a message that says what to fix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraplex.client import Client
from loraplex.client.errors import FailedPreconditionError
from loraplex.client.uploads import UploadChunks
from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import CONFIG_FILE, WEIGHTS_FILE
from loraplex.server.lora.upload import STAGING_DIR
from tests.integration.api.helpers import MAX_RANK, cli, request
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> tuple[Path, Path]:
    front, upload = tmp_path_factory.mktemp("front"), tmp_path_factory.mktemp("uploads")
    write_adapter(front / "by-hand", base_shape, rank=8, seed=31, strength=3.0)
    write_adapter(front / "in-front", base_shape, rank=8, seed=32)
    return front, upload


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, roots: tuple[Path, Path]) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("upload-server") / "server.log"
    flags = (f"--adapters.upload-root={roots[1]}", f"--adapters.max-rank={MAX_RANK}")
    with ServerProcess.start(log, list(roots), *flags) as process:
        yield process
        assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=120) as connected:
        yield connected


def _text(server: ServerProcess, adapter_id: str) -> tuple[str, list[int]]:
    with grpc.insecure_channel(server.target) as channel:
        reply = generation_pb2_grpc.GenerationStub(channel).Generate(request(adapter_id=adapter_id, max_new_tokens=12))
    return reply.text, list(reply.token_ids)


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _staging_left(upload_root: Path) -> list[Path]:
    staging = upload_root / STAGING_DIR
    return sorted(staging.iterdir()) if staging.exists() else []


def test_push_serves_exactly_what_the_same_files_serve_from_disk(
    server: ServerProcess, roots: tuple[Path, Path], tmp_path: Path
) -> None:
    front, upload_root = roots
    trained = tmp_path / "run"
    shutil.copytree(front / "by-hand", trained)
    (trained / "checkpoints").mkdir()
    (trained / "checkpoints" / "step-16.pt").write_bytes(b"optimizer state")
    (trained / "loss_curve.png").write_bytes(b"\x89PNG")
    done = subprocess.run(
        [sys.executable, "-m", "loraplex.trainer.cli", "push", str(trained), "--server", server.target,
         "--adapter-id", "acme/pushed"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"pushed {trained} to {server.target} as 'acme/pushed' version 1" in done.stdout
    # Only the served files travel; they arrive byte for byte.
    assert _digests(upload_root / "acme" / "pushed") == _digests(front / "by-hand")
    assert _staging_left(upload_root) == []
    pushed, by_hand, base = _text(server, "acme/pushed"), _text(server, "by-hand"), _text(server, "")
    assert pushed == by_hand and pushed != base
    # The same hand-off through the loraplex CLI.
    done = cli(server, "adapters", "upload", str(trained), "acme/cli", "--pin", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["adapter_id"], shown["version"], shown["pinned"]) == ("acme/cli", 1, True)
    assert _text(server, "acme/cli") == by_hand


def test_a_replacement_is_a_new_version_and_a_rejected_one_keeps_the_old(
    server: ServerProcess, client: Client, roots: tuple[Path, Path], base_shape: ModelShape, tmp_path: Path
) -> None:
    upload_root = roots[1]
    first = client.upload_adapter(write_adapter(tmp_path / "v1", base_shape, rank=4, seed=41, strength=3.0), "swap")
    v1_text = _text(server, "swap")
    second = client.upload_adapter(write_adapter(tmp_path / "v2", base_shape, rank=8, seed=42, strength=3.0), "swap")
    assert (first.version, second.version) == (1, 2) and (first.rank, second.rank) == (4, 8)
    assert second.content_hash != first.content_hash
    v2_text = _text(server, "swap")
    assert v2_text != v1_text
    v2_files = _digests(upload_root / "swap")

    too_big = write_adapter(tmp_path / "v3", base_shape, rank=2 * MAX_RANK, layers=[0], seed=43)
    with pytest.raises(FailedPreconditionError, match=f"max_rank|{MAX_RANK}"):
        client.upload_adapter(too_big, "swap")
    assert client.get_adapter("swap").version == 2
    assert _text(server, "swap") == v2_text
    assert _digests(upload_root / "swap") == v2_files
    assert _staging_left(upload_root) == []


def _chunks(header: adapters_pb2.UploadAdapterHeader, *data: bytes) -> list[adapters_pb2.UploadAdapterChunk]:
    return [adapters_pb2.UploadAdapterChunk(header=header), *(adapters_pb2.UploadAdapterChunk(data=d) for d in data)]


def _refusal(server: ServerProcess, chunks: Iterator[adapters_pb2.UploadAdapterChunk]) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        adapters_pb2_grpc.AdaptersStub(channel).UploadAdapter(chunks, timeout=60)
    return refused.value.code(), refused.value.details()


def test_damaged_or_malformed_uploads_are_refused_and_leave_nothing_behind(
    server: ServerProcess, roots: tuple[Path, Path], base_shape: ModelShape, tmp_path: Path
) -> None:
    upload_root = roots[1]
    source = write_adapter(tmp_path / "src", base_shape, rank=4, layers=[0], seed=51)
    good = list(UploadChunks(source, "malformed"))
    header, data = good[0].header, b"".join(chunk.data for chunk in good[1:])

    def renamed(adapter_id: str) -> adapters_pb2.UploadAdapterHeader:
        changed = adapters_pb2.UploadAdapterHeader()
        changed.CopyFrom(header)
        changed.adapter_id = adapter_id
        return changed

    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    extra_file = renamed("malformed")
    extra_file.files.add(name="run.py", size_bytes=1, sha256="0" * 64)
    no_weights = renamed("malformed")
    del no_weights.files[1]
    cases = [
        (iter([adapters_pb2.UploadAdapterChunk(data=b"x")]), "the first message of UploadAdapter must be the header"),
        (iter(_chunks(header, bytes(damaged))), "arrived damaged"),
        (iter(_chunks(header, data[:-10])), "the upload ended inside " + WEIGHTS_FILE),
        (iter(_chunks(header, data + b"more")), "more bytes arrived than the header's file sizes"),
        (iter(_chunks(extra_file, data)), "file 'run.py' is not part of an adapter upload"),
        (iter(_chunks(no_weights, data)), f"the upload lacks {WEIGHTS_FILE}"),
        (iter(_chunks(renamed("../escape"), data)), "is not a name"),
    ]
    for chunks, says in cases:
        code, details = _refusal(server, chunks)
        assert (code, says in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details
    code, details = _refusal(server, iter(_chunks(renamed("in-front"), data)))
    assert code == grpc.StatusCode.ABORTED and "searched before the upload root" in details
    assert not (upload_root / "malformed").exists() and not (upload_root.parent / "escape").exists()
    assert _staging_left(upload_root) == []
    assert {p.name for p in (roots[0] / "in-front").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}


def test_a_second_upload_of_the_same_id_is_refused_while_the_first_runs(
    server: ServerProcess, roots: tuple[Path, Path], base_shape: ModelShape, tmp_path: Path
) -> None:
    good = list(UploadChunks(write_adapter(tmp_path / "src", base_shape, rank=4, seed=61), "concurrent"))
    release = threading.Event()

    def slow() -> Iterator[adapters_pb2.UploadAdapterChunk]:
        yield good[0]
        release.wait(60)
        yield from good[1:]

    with grpc.insecure_channel(server.target) as channel:
        first = adapters_pb2_grpc.AdaptersStub(channel).UploadAdapter.future(slow(), timeout=120)
        try:
            deadline = time.monotonic() + 60
            while not _staging_left(roots[1]) and time.monotonic() < deadline:  # the first upload has begun
                time.sleep(0.05)
            assert _refusal(server, iter(good)) == (
                grpc.StatusCode.ABORTED,
                "an upload of adapter 'concurrent' is running; wait for it to finish",
            )
        finally:
            release.set()
        assert first.result().version == 1
    assert _staging_left(roots[1]) == []
