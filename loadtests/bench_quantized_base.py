"""The quantized base's cost per decode step: the decoder projections of a random-weight Llama-shaped layer stack
(q, k, v, o, gate, up, down in every layer; attention and norms left out, they do not depend on the weights'
format) at batch 1, 16 and 64, bf16 vs bitsandbytes nf4 (where bitsandbytes imports) vs fp8 (server/model/fp8.py:
torch._scaled_mm on CUDA, the reference path elsewhere), timed side by side in one run; ms per step and ratios to
bf16.

    python -m loadtests.bench_quantized_base --shape tiny                  # CPU: proves it runs
    python -m loadtests.bench_quantized_base --shape llama-8b --json out.json   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from loadtests.random_model import PRESETS
from loraplex.server.model.fp8 import Fp8Linear, check_fp8_device

Stack = list[dict[str, nn.Module]]
BATCHES = (1, 16, 64)


def _dims(preset: dict[str, int]) -> dict[str, tuple[int, int]]:
    hidden, inter = preset["hidden_size"], preset["intermediate_size"]
    kv = hidden // preset["num_attention_heads"] * preset["num_key_value_heads"]
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _nf4(linear: nn.Linear, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    from loraplex.server.model.quantize import keep_canonical_layout, quiet_bitsandbytes

    quiet_bitsandbytes()
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=False, compute_dtype=dtype, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    layer = layer.to(device)
    keep_canonical_layout(layer)
    return layer


def build_stacks(shape: str, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, Stack], dict[str, str]]:
    """One layer stack per weight format (the same random weights), and why a format was left out."""
    preset = PRESETS[shape]
    dims = _dims(preset)
    stacks: dict[str, Stack] = {"bf16": [], "nf4": [], "fp8": []}
    skipped: dict[str, str] = {}
    try:
        check_fp8_device(device)
    except ValueError as exc:
        skipped["fp8"] = str(exc)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        skipped["nf4"] = f"bitsandbytes does not import: {exc}"
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(preset["num_hidden_layers"]):
        layer: dict[str, dict[str, nn.Module]] = {name: {} for name in stacks}
        for module, (fan_in, fan_out) in dims.items():
            linear = nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
            linear.weight.normal_(0.0, fan_in**-0.5, generator=generator)
            layer["bf16"][module] = linear
            if "fp8" not in skipped:
                layer["fp8"][module] = Fp8Linear(linear, dtype, scaled_mm=device.type == "cuda")
            if "nf4" not in skipped:
                try:
                    layer["nf4"][module] = _nf4(linear, dtype, device)
                except Exception as exc:  # a bitsandbytes build without this device's kernels
                    skipped["nf4"] = f"{type(exc).__name__}: {exc}"
        for name, stack in stacks.items():
            stack.append(layer[name])
    return {name: stack for name, stack in stacks.items() if name not in skipped}, skipped


def decode_step(stack: Stack, x: torch.Tensor) -> torch.Tensor:
    """Every projection of every layer once, each fed a tensor of its input width (a residual keeps it honest)."""
    for layer in stack:
        q, k, v = layer["q_proj"](x), layer["k_proj"](x), layer["v_proj"](x)
        x = x + layer["o_proj"](q) + (k.sum() + v.sum()) * 0
        hidden = torch.nn.functional.silu(layer["gate_proj"](x)) * layer["up_proj"](x)
        x = x + layer["down_proj"](hidden)
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6) * x.shape[-1] ** 0.5
    return x


def time_step(step: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median ms of ``repeats`` calls after two warm-up calls, synchronized on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for index in range(repeats + 2):
        sync()
        started = time.perf_counter()
        step()
        sync()
        if index >= 2:
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    stacks, skipped = build_stacks(args.shape, dtype, device)
    hidden = PRESETS[args.shape]["hidden_size"]
    rows: list[tuple[int, dict[str, float]]] = []
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, hidden, device=device, dtype=dtype)
            # Formats interleaved per repeat block (A B C C B A), so drift hits all of them alike.
            order = list(stacks) + list(reversed(stacks))
            per_format: dict[str, list[float]] = {name: [] for name in stacks}
            for name in order:
                stack = stacks[name]
                per_format[name].append(time_step(partial(decode_step, stack, x), device, args.repeats))
            ms = {name: statistics.mean(values) for name, values in per_format.items()}
            rows.append((batch, ms))
    print(f"shape {args.shape} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    print(f"{'batch':>5}  " + "  ".join(f"{name + ' ms':>10}  {name + '/bf16':>9}" for name in stacks))
    for batch, ms in rows:
        print(f"{batch:>5}  " + "  ".join(f"{ms[n]:>10.3f}  {ms[n] / ms['bf16']:>9.2f}" for n in stacks))
    for name, reason in skipped.items():
        print(f"{name}: left out: {reason}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shape": args.shape,
                    "device": str(device),
                    "ms": {batch: ms for batch, ms in rows},
                    "skipped": skipped,
                }
            )
        )


if __name__ == "__main__":
    main()
