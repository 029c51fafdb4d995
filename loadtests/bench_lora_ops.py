"""Micro-benchmark of the batched-LoRA backends for one linear layer, against the base layer itself.

For each token count (decode-sized to prefill-sized), every token's adapter drawn from ``--adapters`` resident
slots: the base matmul, the grouped backend, the gather backend and the per-token reference loop (small cases only);
then the decode case the window kernel serves (every token its own adapter, slots 0 .. tokens - 1), with the
compiled fused kernel (``y + delta`` in one pass) where it runs (CPU, bfloat16/float16). This is the
measurement behind the per-segment kernel rule in ``loraplex.server.lora.ops``.

    python loadtests/bench_lora_ops.py                                  # SmolLM2 gate_proj shape on CPU, fp32
    python loadtests/bench_lora_ops.py --device cuda --dtype bfloat16 --fan-in 4096 --fan-out 14336
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from loraplex.server.lora.ops import (
    SlotWindow,
    fused_kernel_works,
    lora_add_fused,
    lora_delta_gather,
    lora_delta_grouped,
    lora_delta_reference,
    lora_delta_window,
)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` after warm-up (synchronising on CUDA)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--fan-in", type=int, default=576)
    parser.add_argument("--fan-out", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--tokens", default="8,32,128,512")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(args.fan_out, args.fan_in, generator=generator).to(device, dtype)
    a = (torch.randn(args.adapters, args.fan_in, args.rank, generator=generator) / args.fan_in**0.5).to(device, dtype)
    b = (torch.randn(args.adapters, args.rank, args.fan_out, generator=generator) / args.rank).to(device, dtype)
    print(
        f"{args.fan_in}->{args.fan_out}, rank {args.rank}, {args.adapters} adapters, {device} {args.dtype}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'tokens':>7} {'base ms':>9} {'grouped ms':>11} {'gather ms':>10} {'loop ms':>9} {'grouped/base':>13}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, args.fan_in, generator=generator).to(device, dtype)
        slots = torch.sort(torch.randint(0, args.adapters, (tokens,), generator=generator)).values.to(device)
        ends = torch.bincount(slots, minlength=args.adapters).cumsum(0).to(torch.int32)
        base_ms = timed(lambda x=x: x @ weight.T, device, args.repeats)
        grouped_ms = timed(lambda x=x, s=slots, e=ends: lora_delta_grouped(x, a, b, s, e), device, args.repeats)
        gather_ms = timed(lambda x=x, s=slots, e=ends: lora_delta_gather(x, a, b, s, e), device, args.repeats)
        loop = (
            f"{timed(lambda x=x, s=slots: lora_delta_reference(x, a, b, s), device, 5):9.3f}"
            if tokens <= 128
            else f"{'-':>9}"
        )
        print(f"{tokens:7d} {base_ms:9.3f} {grouped_ms:11.3f} {gather_ms:10.3f} {loop} {grouped_ms / base_ms:13.2f}")
    print("\none token per adapter (decode over distinct adapters)")
    fused = fused_kernel_works(device, dtype)
    print(
        f"{'tokens':>7} {'base ms':>9} {'grouped ms':>11} {'gather ms':>10} {'window ms':>10} {'window/base':>12} "
        f"{'fused ms':>9}"
    )
    for tokens in (int(t) for t in args.tokens.split(",") if int(t) <= args.adapters):
        x = torch.randn(tokens, args.fan_in, generator=generator).to(device, dtype)
        slots = torch.arange(tokens, device=device)
        ends = torch.bincount(slots, minlength=args.adapters).cumsum(0).to(torch.int32)
        window = SlotWindow(0, tokens, None)
        base_ms = timed(lambda x=x: x @ weight.T, device, args.repeats)
        grouped_ms = timed(lambda x=x, s=slots, e=ends: lora_delta_grouped(x, a, b, s, e), device, args.repeats)
        gather_ms = timed(lambda x=x, s=slots, e=ends: lora_delta_gather(x, a, b, s, e), device, args.repeats)
        window_ms = timed(lambda x=x, w=window: lora_delta_window(x, a, b, w), device, args.repeats)
        y = x @ weight.T
        fused_ms = (
            f"{timed(lambda x=x, y=y, w=window, s=slots: lora_add_fused(y, x, a, b, w, s), device, args.repeats):9.3f}"
            if fused and tokens >= 2
            else f"{'-':>9}"
        )
        print(
            f"{tokens:7d} {base_ms:9.3f} {grouped_ms:11.3f} {gather_ms:10.3f} {window_ms:10.3f} "
            f"{window_ms / base_ms:12.2f} {fused_ms}"
        )


if __name__ == "__main__":
    main()
