"""``loraplex-train``: train | eval | reference | export | push.

- ``loraplex-train train CONFIG.yaml [--key value ...]``: every config key is also a flag; under
  ``torchrun --nproc_per_node N`` it trains data-parallel.
- ``loraplex-train eval ADAPTER_DIR [--data PATH:FORMAT ...]``: loss, perplexity and generation metrics of adapter
  and base side by side, on the run's held-out data (from its manifest) or on the given files.
- ``loraplex-train reference ADAPTER_DIR [--data PATH:FORMAT ...]``: recompute the drift reference statistics.
- ``loraplex-train export ADAPTER_DIR --merge --output DIR [--format onnx]``: the merged HF model, and ONNX.
- ``loraplex-train push ADAPTER_DIR --server HOST:PORT [--adapter-id ID]``: upload to a server and hot-load it.

Bad input exits with status 2 and one message saying what to fix, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loraplex.client.cli import add_connection_flags
from loraplex.server.lora.format import MANIFEST_FILE
from loraplex.trainer.config import DatasetSpec, TrainConfig, add_flags, flag_values, load_config
from loraplex.trainer.data import held_out
from loraplex.trainer.errors import ConfigError, PushError, TrainerError
from loraplex.trainer.export import PROVIDERS

log = logging.getLogger("loraplex.trainer")


def _train(args: argparse.Namespace) -> None:
    from loraplex.trainer.train import train

    config = load_config(args.config, flag_values(args))
    result = train(config)
    if result.eval is not None:
        print(result.eval.markdown())
    print(f"adapter written to {result.output_dir} after {result.steps} steps ({result.tokens_per_second:.0f} tok/s)")


def _run_config(adapter_dir: Path, base_model: str | None) -> TrainConfig:
    """The training config recorded in the adapter's manifest (base model overridable)."""
    path = adapter_dir / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter_dir} has no {MANIFEST_FILE}; it was not written by loraplex-train")
    record = json.loads(path.read_text())["training"]
    if base_model is not None:
        record["base_model"] = base_model
    record |= {"resume_from_checkpoint": None, "progress": False}
    return load_config(None, record)


def _load_for_held_out(args: argparse.Namespace) -> tuple[TrainConfig, torch.device, Any, Any]:
    """The run's config (held-out files replaced by ``--data``), the device, and the trained adapter on its base."""
    from loraplex.trainer.model import load_trained

    config = _run_config(args.adapter, args.base_model)
    if args.data:
        config = config.model_copy(update={"val_datasets": tuple(DatasetSpec.model_validate(d) for d in args.data)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peft_model, tokenizer = load_trained(args.adapter, config, device)
    return config, device, peft_model, tokenizer


def _eval(args: argparse.Namespace) -> None:
    from loraplex.trainer.evaluate import evaluate
    from loraplex.trainer.report import write_eval_report

    config, device, peft_model, tokenizer = _load_for_held_out(args)
    examples, encoded = held_out(config, tokenizer)
    report = evaluate(
        peft_model,
        tokenizer,
        examples,
        encoded,
        max_examples=args.max_examples or config.eval_max_examples,
        max_new_tokens=config.eval_max_new_tokens,
        batch_size=config.eval_batch_size,
        device=device,
    )
    print(report.markdown())
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        write_eval_report(args.output, report)


def _reference(args: argparse.Namespace) -> None:
    """Recomputes the drift reference statistics on held-out data and rewrites them into the manifest."""
    from loraplex.server.lora.manifest import AdapterManifest
    from loraplex.trainer.reference import reference_stats

    config, device, peft_model, tokenizer = _load_for_held_out(args)
    examples, _ = held_out(config, tokenizer)
    reference = reference_stats(peft_model, tokenizer, examples, config.eval_batch_size, device)
    if reference is None:
        raise ConfigError("no held-out examples to compute reference statistics from; pass --data PATH:FORMAT")
    manifest = AdapterManifest.from_dict(json.loads((args.adapter / MANIFEST_FILE).read_text()))
    replace(manifest, reference=reference).write(args.adapter)
    print(f"reference statistics of {reference.num_examples} examples written to {args.adapter / MANIFEST_FILE}")


def _export(args: argparse.Namespace) -> None:
    from loraplex.trainer.export import ONNX_FILE, export_onnx, merge

    if not args.merge:
        raise ConfigError("export writes a merged model: pass --merge (keep adapters unmerged for serving)")
    config = _run_config(args.adapter, args.base_model)
    merged = merge(args.adapter, config, args.output)
    print(f"merged model written to {merged}")
    if args.format == "onnx":
        worst = export_onnx(merged, merged / ONNX_FILE, args.provider)
        print(f"ONNX model written to {merged / ONNX_FILE}; max abs logit difference vs torch: {worst:.3e}")


def _push(args: argparse.Namespace) -> None:
    from loraplex.client.cli import client_from_args
    from loraplex.client.errors import LoraplexError

    adapter_id = args.adapter_id or args.adapter.resolve().name
    try:
        with client_from_args(args) as client:
            adapter = client.upload_adapter(args.adapter, adapter_id, args.pin)
    except (LoraplexError, FileNotFoundError) as exc:
        raise PushError(f"push to {args.target} failed: {exc}") from exc
    print(
        f"pushed {args.adapter} to {args.target} as '{adapter.adapter_id}' version {adapter.version} "
        f"(rank {adapter.rank}, {adapter.size_bytes} bytes, {adapter.tier}); serving now"
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="loraplex-train", description="LoRA adapters that loraplex serves as-is")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train an adapter from a YAML config (keys also as flags)")
    train.add_argument("config", type=Path, nargs="?", default=None, help="YAML config file")
    add_flags(train)
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="adapter vs base on held-out data")
    evaluate.add_argument("adapter", type=Path, help="adapter directory written by loraplex-train")
    evaluate.add_argument("--data", action="append", default=[], metavar="PATH:FORMAT", help="held-out file(s)")
    evaluate.add_argument("--max-examples", type=int, default=None, help="examples to generate for")
    evaluate.add_argument("--base-model", default=None, help="override the base recorded in the manifest")
    evaluate.add_argument("--output", type=Path, default=None, help="directory for eval_report.{json,md}")
    evaluate.set_defaults(run=_eval)
    refresh = commands.add_parser("reference", help="recompute the drift reference statistics in loraplex.json")
    refresh.add_argument("adapter", type=Path, help="adapter directory written by loraplex-train")
    refresh.add_argument("--data", action="append", default=[], metavar="PATH:FORMAT", help="held-out file(s)")
    refresh.add_argument("--base-model", default=None, help="override the base recorded in the manifest")
    refresh.set_defaults(run=_reference)
    export = commands.add_parser("export", help="merge the adapter into its base; optionally to ONNX")
    export.add_argument("adapter", type=Path, help="adapter directory written by loraplex-train")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the (float) base")
    export.add_argument("--output", type=Path, required=True, help="directory for the merged model")
    export.add_argument("--format", choices=("hf", "onnx"), default="hf", help="hf, or onnx (also writes hf)")
    export.add_argument("--base-model", default=None, help="override the base recorded in the manifest")
    export.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="auto",
        help="onnxruntime provider checking the ONNX logits: auto (CUDA where onnxruntime-gpu has it, else CPU)",
    )
    export.set_defaults(run=_export)
    push = commands.add_parser("push", help="upload the adapter to a loraplex server and hot-load it (admin)")
    push.add_argument("adapter", type=Path, help="adapter directory written by loraplex-train")
    push.add_argument("--adapter-id", default=None, help="id it is served under (default: the directory's name)")
    push.add_argument("--pin", action="store_true", default=None, help="keep it on the server's device")
    add_connection_flags(push, "--server")
    push.set_defaults(run=_push)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except TrainerError as exc:
        print(f"loraplex-train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
