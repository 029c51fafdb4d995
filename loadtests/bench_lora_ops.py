"""Micro-benchmark of the batched-LoRA backends for one linear layer, against the base layer itself.

For each token count (decode-sized to prefill-sized), every token's adapter drawn from ``--adapters`` resident
slots: the base matmul, the grouped backend, the gather backend and the per-token reference loop (small cases only);
then the decode case the window kernel serves (every token its own adapter, slots 0 .. tokens - 1), with the
compiled fused kernel (``y + delta`` in one pass) where it runs (CPU, bfloat16/float16), and the Triton kernels
(``y += delta`` in place, one shrink and one expand launch) on CUDA. This is the
measurement behind the per-segment kernel rule in ``loraplex.server.lora.ops``.

    python loadtests/bench_lora_ops.py                                  # SmolLM2 gate_proj shape on CPU, fp32
    python loadtests/bench_lora_ops.py --device cuda --dtype bfloat16 --fan-in 4096 --fan-out 14336
"""

from __future__ import annotations

import argparse

import torch

from loraplex.server.lora.calibration import median_ms
from loraplex.server.lora.ops import (
    SlotWindow,
    fused_kernel_works,
    lora_add_fused,
    lora_add_triton,
    lora_delta_gather,
    lora_delta_grouped,
    lora_delta_reference,
    lora_delta_window,
    triton_runs,
)


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
    reps = args.repeats
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(args.fan_out, args.fan_in, generator=generator).to(device, dtype)
    a = (torch.randn(args.adapters, args.fan_in, args.rank, generator=generator) / args.fan_in**0.5).to(device, dtype)
    b = (torch.randn(args.adapters, args.rank, args.fan_out, generator=generator) / args.rank).to(device, dtype)
    print(
        f"{args.fan_in}->{args.fan_out}, rank {args.rank}, {args.adapters} adapters, {device} {args.dtype}, "
        f"threads {torch.get_num_threads()}"
    )
    triton = triton_runs(device) and device.type == "cuda"
    print(
        f"{'tokens':>7} {'base ms':>9} {'grouped ms':>11} {'gather ms':>10} {'loop ms':>9} {'grouped/base':>13} "
        f"{'triton ms':>10}"
    )
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, args.fan_in, generator=generator).to(device, dtype)
        slots = torch.sort(torch.randint(0, args.adapters, (tokens,), generator=generator)).values.to(device)
        ends = torch.bincount(slots, minlength=args.adapters).cumsum(0).to(torch.int32)
        base_ms = median_ms(lambda x=x: x @ weight.T, device, reps)
        grouped_ms = median_ms(lambda x=x, s=slots, e=ends: lora_delta_grouped(x, a, b, s, e), device, reps)
        gather_ms = median_ms(lambda x=x, s=slots, e=ends: lora_delta_gather(x, a, b, s, e), device, reps)
        loop = (
            f"{median_ms(lambda x=x, s=slots: lora_delta_reference(x, a, b, s), device, 5):9.3f}"
            if tokens <= 128
            else f"{'-':>9}"
        )
        y = x @ weight.T
        groups = int(torch.unique(slots).numel())
        triton_ms = (
            f"{median_ms(lambda x=x, y=y, e=ends, g=groups: lora_add_triton(y, x, a, b, e, g), device, reps):10.3f}"
            if triton
            else f"{'-':>10}"
        )
        print(
            f"{tokens:7d} {base_ms:9.3f} {grouped_ms:11.3f} {gather_ms:10.3f} {loop} {grouped_ms / base_ms:13.2f} "
            f"{triton_ms}"
        )
    print("\none token per adapter (decode over distinct adapters)")
    fused = fused_kernel_works(device, dtype)
    print(
        f"{'tokens':>7} {'base ms':>9} {'grouped ms':>11} {'gather ms':>10} {'window ms':>10} {'window/base':>12} "
        f"{'fused ms':>9} {'triton ms':>10}"
    )
    for tokens in (int(t) for t in args.tokens.split(",") if int(t) <= args.adapters):
        x = torch.randn(tokens, args.fan_in, generator=generator).to(device, dtype)
        slots = torch.arange(tokens, device=device)
        ends = torch.bincount(slots, minlength=args.adapters).cumsum(0).to(torch.int32)
        window = SlotWindow(0, tokens, None)
        base_ms = median_ms(lambda x=x: x @ weight.T, device, reps)
        grouped_ms = median_ms(lambda x=x, s=slots, e=ends: lora_delta_grouped(x, a, b, s, e), device, reps)
        gather_ms = median_ms(lambda x=x, s=slots, e=ends: lora_delta_gather(x, a, b, s, e), device, reps)
        window_ms = median_ms(lambda x=x, w=window: lora_delta_window(x, a, b, w), device, reps)
        y = x @ weight.T
        fused_ms = (
            f"{median_ms(lambda x=x, y=y, w=window, s=slots: lora_add_fused(y, x, a, b, w, s), device, reps):9.3f}"
            if fused and tokens >= 2
            else f"{'-':>9}"
        )
        triton_ms = (
            f"{median_ms(lambda x=x, y=y, e=ends, n=tokens: lora_add_triton(y, x, a, b, e, n), device, reps):10.3f}"
            if triton
            else f"{'-':>10}"
        )
        print(
            f"{tokens:7d} {base_ms:9.3f} {grouped_ms:11.3f} {gather_ms:10.3f} {window_ms:10.3f} "
            f"{window_ms / base_ms:12.2f} {fused_ms} {triton_ms}"
        )


if __name__ == "__main__":
    main()
