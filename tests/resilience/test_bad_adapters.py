"""Resilience scenario 4, bad adapter files, through the real server: each broken adapter is refused by LoadAdapter
and by a generation naming it, with its status code and a message that says what to fix, while the server keeps
serving; a NaN adapter never poisons the other rows of a batch; a file rewritten while it is loaded gives one
whole version or a clear refusal, never a mix.

The engine-level cases of the same checks are in ``tests/unit/engine/test_adapter_format.py``; here they go through
the gRPC API, the adapter cache and the loader threads of a running server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.proto.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE
from tests.integration.api.helpers import request
from tests.support.adapters import write_adapter
from tests.support.resilience import full_run, record
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.resilience

MAX_RANK = 8
NEW_TOKENS = 12  # the rows checked for poisoning
CHECK_TOKENS = 4  # the normal request after each refusal
FAILED, INVALID, MISSING = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
)


def _rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    weights = directory / WEIGHTS_FILE
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        key = sorted(tensors)[0]
        tensors[key][0, 0] = value

    return change


def _overflow(tensors: dict[str, torch.Tensor]) -> None:
    """Finite weights (they pass every format check) whose product overflows float32 inside the forward pass."""
    for key in tensors:
        tensors[key] *= 1e30 if "lora_B" in key else 1e10


def _drop_lora_b(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if "lora_B" in k]:
        del tensors[key]


@dataclass(frozen=True)
class Case:
    kind: str
    code: grpc.StatusCode
    says: str  # the part of the message that tells what to fix
    build: Callable[[Path, Path, ModelShape], str]  # (root, a directory outside it, shape) -> the adapter id


def _adapter(root: Path, adapter_id: str, shape: ModelShape, **options: object) -> Path:
    settings: dict[str, object] = {"rank": 4, "layers": [0], "seed": 5}
    settings.update(options)
    return write_adapter(root / adapter_id, shape, **settings)  # type: ignore[arg-type]


def _truncated(root: Path, outside: Path, shape: ModelShape) -> str:
    weights = _adapter(root, "truncated", shape) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "truncated"


def _float64(root: Path, outside: Path, shape: ModelShape) -> str:
    _adapter(root, "float64", shape, dtype=torch.float64)
    return "float64"


def _int32(root: Path, outside: Path, shape: ModelShape) -> str:
    _adapter(root, "int32", shape, dtype=torch.int32)
    return "int32"


def _nan(root: Path, outside: Path, shape: ModelShape) -> str:
    _rewrite_weights(_adapter(root, "nan", shape), _poison(float("nan")))
    return "nan"


def _inf(root: Path, outside: Path, shape: ModelShape) -> str:
    _rewrite_weights(_adapter(root, "inf", shape), _poison(float("-inf")))
    return "inf"


def _other_base(root: Path, outside: Path, shape: ModelShape) -> str:
    bigger = dataclasses.replace(shape, hidden_size=shape.hidden_size * 2, head_dim=shape.head_dim * 2)
    _adapter(root, "other-base", bigger)
    return "other-base"


def _deeper_base(root: Path, outside: Path, shape: ModelShape) -> str:
    _adapter(root, "deeper-base", shape, layers=[shape.num_layers + 3])
    return "deeper-base"


def _rank(root: Path, outside: Path, shape: ModelShape) -> str:
    _adapter(root, "rank-too-high", shape, rank=2 * MAX_RANK)
    return "rank-too-high"


def _pickle_only(root: Path, outside: Path, shape: ModelShape) -> str:
    directory = _adapter(root, "pickle-only", shape)
    (directory / WEIGHTS_FILE).rename(directory / PICKLE_WEIGHTS_FILE)
    return "pickle-only"


def _symlink(root: Path, outside: Path, shape: ModelShape) -> str:
    (root / "escape").symlink_to(_adapter(outside, "elsewhere", shape), target_is_directory=True)
    return "escape"


def _dotdot(root: Path, outside: Path, shape: ModelShape) -> str:
    _adapter(outside, "reachable-by-dotdot", shape)
    return f"../{outside.name}/reachable-by-dotdot"


def _missing_config(root: Path, outside: Path, shape: ModelShape) -> str:
    (_adapter(root, "no-config", shape) / CONFIG_FILE).unlink()
    return "no-config"


def _garbage_config(root: Path, outside: Path, shape: ModelShape) -> str:
    (_adapter(root, "garbage-config", shape) / CONFIG_FILE).write_bytes(b'{"peft_type": "LORA", "r": ')
    return "garbage-config"


def _peft_type(root: Path, outside: Path, shape: ModelShape) -> str:
    _adapter(root, "ia3", shape, extra_config={"peft_type": "IA3"})
    return "ia3"


def _sparse_2gb(root: Path, outside: Path, shape: ModelShape) -> str:
    weights = _adapter(root, "two-gigabytes", shape) / WEIGHTS_FILE
    with weights.open("r+b") as handle:
        handle.truncate(2 * 1024**3)  # sparse: takes no disk, reads as zeros
    return "two-gigabytes"


def _no_lora_b(root: Path, outside: Path, shape: ModelShape) -> str:
    _rewrite_weights(_adapter(root, "no-lora-b", shape), _drop_lora_b)
    return "no-lora-b"


def _absent(root: Path, outside: Path, shape: ModelShape) -> str:
    return "never-written"


CASES = (
    Case("truncated safetensors", FAILED, "is corrupt or truncated", _truncated),
    Case("float64 weights", FAILED, "has dtype torch.float64; use float32, float16 or bfloat16", _float64),
    Case("int32 weights", FAILED, "has dtype torch.int32; use float32, float16 or bfloat16", _int32),
    Case("NaN weight", FAILED, "weights contain NaN or Inf; re-train or re-export", _nan),
    Case("-Inf weight", FAILED, "weights contain NaN or Inf; re-train or re-export", _inf),
    Case("shapes for another base", FAILED, "do not fit this base", _other_base),
    Case("layers the base lacks", FAILED, "(adapter trained for another base)", _deeper_base),
    Case("rank above the maximum", FAILED, f"exceeds the server's maximum {MAX_RANK} (adapters.max_rank)", _rank),
    Case("pickle .bin only", FAILED, "loraplex never unpickles: re-save with", _pickle_only),
    Case("symlink escaping the root", FAILED, "copy the adapter under the root instead", _symlink),
    Case("'..' in the id", INVALID, "(no absolute paths, no '..')", _dotdot),
    Case("missing config", FAILED, f"{CONFIG_FILE} is missing; a PEFT LoRA adapter directory needs", _missing_config),
    Case("config not JSON", FAILED, "is not readable JSON", _garbage_config),
    Case("unknown peft_type", FAILED, "peft_type is 'IA3'; loraplex serves only LORA adapters", _peft_type),
    Case("2 GB sparse file over the budget", FAILED, "over the limit of 1073741824 (adapters.", _sparse_2gb),
    Case("lora_A without lora_B", FAILED, "needs both lora_A and lora_B weights", _no_lora_b),
    Case("no such adapter", MISSING, "not found under", _absent),
)  # fmt: skip


@dataclass
class Served:
    server: ServerProcess
    root: Path
    shape: ModelShape
    ids: dict[str, str]  # case kind -> adapter id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, base_shape: ModelShape) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("bad-adapters")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    ids = {case.kind: case.build(root, outside, base_shape) for case in CASES}
    write_adapter(root / "good", base_shape, rank=8, seed=11, strength=3.0)
    _rewrite_weights(_adapter(root, "overflow", base_shape), _overflow)
    flags = (f"--adapters.max-rank={MAX_RANK}", "--engine.max-new-tokens=64", "--server.default-max-new-tokens=4")
    with ServerProcess.start(base / "server.log", [root], *flags) as server:
        yield Served(server, root, base_shape, ids)
        assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.server.target) as opened:
        yield opened


def refusal(call: Callable[..., object], *args: object) -> tuple[grpc.StatusCode, str]:
    """The status of ``call(*args)``: OK, or the code and message it was refused with."""
    try:
        call(*args, timeout=60)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def good_tokens(stub: generation_pb2_grpc.GenerationStub, new_tokens: int = NEW_TOKENS) -> list[int]:
    response = stub.Generate(request(adapter_id="good", max_new_tokens=new_tokens, ignore_eos=True), timeout=120)
    return list(response.token_ids)


def test_each_bad_adapter_is_refused_with_what_to_fix_and_the_server_keeps_serving(
    served: Served, channel: grpc.Channel
) -> None:
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    generation = generation_pb2_grpc.GenerationStub(channel)
    reference = good_tokens(generation, CHECK_TOKENS)
    wrong: list[str] = []
    for case in CASES:
        adapter_id = served.ids[case.kind]
        load = refusal(adapters.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id))
        generate = refusal(generation.Generate, request(adapter_id=adapter_id, max_new_tokens=2))
        for what, (code, message) in (("LoadAdapter", load), ("Generate", generate)):
            if code != case.code or case.says not in message:
                wrong.append(f"{case.kind}, {what}: {code.name} {message!r}")
        assert good_tokens(generation, CHECK_TOKENS) == reference, f"after {case.kind}"  # still serving, unchanged
    kinds = len(CASES)
    figure = f"{kinds} kinds of bad adapter files: {kinds - len(wrong) // 2} refused with their code and fix; normal requests unchanged after each"  # noqa: E501
    record(4, "bad adapter files", figure, "each refused with a clear message; server keeps serving", not wrong)
    assert not wrong, wrong
    assert served.server.process.poll() is None and "Traceback" not in served.server.log()
    listed = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters
    assert [a.adapter_id for a in listed if a.version] == ["good"]  # nothing bad was half-registered (all version 0)


def test_bad_adapters_requested_inside_a_running_batch_leave_its_other_rows_unchanged(
    served: Served, channel: grpc.Channel
) -> None:
    generation = generation_pb2_grpc.GenerationStub(channel)
    reference = good_tokens(generation)
    poisoned = [served.ids[kind] for kind in ("NaN weight", "-Inf weight", "truncated safetensors", "int32 weights")]
    rounds = 5 if full_run() else 2
    for _ in range(rounds):
        streams = [
            generation.GenerateStream(request(adapter_id="good", max_new_tokens=NEW_TOKENS, ignore_eos=True))
            for _ in range(3)
        ]
        firsts = [next(stream) for stream in streams]  # the good rows are running
        codes = [refusal(generation.Generate, request(adapter_id=a, max_new_tokens=4))[0] for a in poisoned]
        assert codes == [FAILED] * len(poisoned)
        for first, stream in zip(firsts, streams, strict=True):
            tokens = list(first.token_ids) + [t for message in stream for t in message.token_ids]
            assert tokens == reference  # greedy: exactly what the adapter gives alone
    figure = f"NaN/Inf/corrupt adapters requested beside {rounds * 3} running rows: all refused, every row unchanged"
    record(4, "bad adapter files", figure, "no poisoning of other rows of the batch", True)


def test_an_adapter_whose_finite_weights_overflow_fails_only_its_own_rows(
    served: Served, channel: grpc.Channel
) -> None:
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    loaded = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="overflow"), timeout=60)
    assert loaded.adapter_id == "overflow"  # finite weights: no format check can refuse them
    generation = generation_pb2_grpc.GenerationStub(channel)
    reference = good_tokens(generation)
    sampled = {"temperature": 0.8, "seed": 3}  # sampling from NaN probabilities used to fail the whole batch
    for sampling in ({}, sampled, {"logprobs": True}):
        stream = generation.GenerateStream(request(adapter_id="good", max_new_tokens=NEW_TOKENS, ignore_eos=True))
        first = next(stream)
        code, message = refusal(generation.Generate, request(adapter_id="overflow", max_new_tokens=4, **sampling))
        assert code == FAILED and "produced NaN or Inf logits" in message and "re-train or re-export" in message
        assert list(first.token_ids) + [t for m in stream for t in m.token_ids] == reference
    figure = "overflowing finite weights: its rows FAILED_PRECONDITION at the first NaN logits (greedy and sampled)"
    record(4, "bad adapter files", figure + ", the rows beside it unchanged", "no poisoning of other rows", True)


def _content_hash(directory: Path) -> str:
    return hashlib.sha256((directory / CONFIG_FILE).read_bytes() + (directory / WEIGHTS_FILE).read_bytes()).hexdigest()[
        :16
    ]


def test_a_weights_file_rewritten_while_it_loads_gives_one_whole_version_or_a_clear_refusal(
    served: Served, channel: grpc.Channel
) -> None:
    directory = served.root / "rewritten"
    versions: list[bytes] = []
    for seed in (21, 22):  # same config, different weights: a mix of the two would pass every format check
        write_adapter(directory, served.shape, rank=4, seed=seed, strength=3.0)
        versions.append((directory / WEIGHTS_FILE).read_bytes())
    hashes = {hashlib.sha256((directory / CONFIG_FILE).read_bytes() + v).hexdigest()[:16] for v in versions}
    stop = threading.Event()

    def rewrite_in_place() -> None:  # truncate and write again, not an atomic rename: readers can see any prefix
        index = 0
        while not stop.is_set():
            with (directory / WEIGHTS_FILE).open("wb") as handle:
                data = versions[index % 2]
                for start in range(0, len(data), 64 * 1024):
                    handle.write(data[start : start + 64 * 1024])
                    handle.flush()
            index += 1
            time.sleep(0.001)

    writer = threading.Thread(target=rewrite_in_place)
    writer.start()
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    outcomes: list[tuple[grpc.StatusCode, str]] = []
    try:
        deadline = time.monotonic() + (30 if full_run() else 4)
        while time.monotonic() < deadline:
            try:
                loaded = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="rewritten"), timeout=60)
                outcomes.append((grpc.StatusCode.OK, loaded.content_hash))
            except grpc.RpcError as error:
                outcomes.append((error.code(), error.details() or ""))
    finally:
        stop.set()
        writer.join()
    loaded_hashes = {detail for code, detail in outcomes if code == grpc.StatusCode.OK}
    refused = [detail for code, detail in outcomes if code != grpc.StatusCode.OK]
    assert loaded_hashes <= hashes  # only whole versions were ever served
    assert all(code == FAILED for code, _ in outcomes if code != grpc.StatusCode.OK), outcomes
    assert all("corrupt or truncated" in d or "holds no LoRA weights" in d for d in refused), refused
    final = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id="rewritten"), timeout=60)
    assert final.content_hash == _content_hash(directory)
    generation = generation_pb2_grpc.GenerationStub(channel)
    answer = generation.Generate(request(adapter_id="rewritten", max_new_tokens=2), timeout=60)
    assert answer.served_by.adapter_version == final.version and answer.usage.completion_tokens == 2
    figure = (
        f"{len(outcomes)} loads while the weights file was rewritten in place: {len(outcomes) - len(refused)} "
        f"whole versions ({len(loaded_hashes)} distinct), {len(refused)} refused as truncated, 0 mixed"
    )
    record(4, "bad adapter files", figure, "one whole version or a clear refusal", True)
    print(figure)
    assert outcomes and os.path.getsize(directory / WEIGHTS_FILE) == len(versions[0])
