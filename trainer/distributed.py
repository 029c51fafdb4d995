"""Data parallelism under ``torchrun``: process group set-up and the few collectives the trainer needs.

Gradients are summed across processes by one all-reduce of the flattened LoRA gradients per optimizer step (the
loss is already divided by the global target count), so N processes with batch B give the same update as one
process with N·B examples. gloo on CPU, NCCL on CUDA; a single process needs no process group at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Cluster:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, value: float, device: torch.device) -> float:
        """``value`` summed over all processes."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replaces each parameter's gradient by its sum over all processes (missing gradients count as zero)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param in params:
            size = param.numel()
            param.grad = flat[offset : offset + size].view_as(param).clone()
            offset += size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_cluster(device: torch.device) -> tuple[Cluster, torch.device]:
    """Joins the torchrun process group if there is one; returns it and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Cluster(rank, world, local), device


def shutdown_cluster(cluster: Cluster) -> None:
    if cluster.active and dist.is_initialized():
        dist.destroy_process_group()
