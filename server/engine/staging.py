"""One host → device transfer per engine step: the step's index tensors go to the device together.

A step batch carries a dozen small index tensors (token ids, positions, cache slots, the attention plan's key slots
and mask, each LoRA segment's slots, group ends, window and padded indices). Built on the device one by one, each
is a blocking copy from pageable memory (a host sync on CUDA). :class:`StepUpload` instead takes the batch built on
the host, packs every tensor into one pinned ``int64`` buffer, copies it with one non-blocking copy, and rebuilds
the batch from device views of it (cast back to ``int32`` / ``bool`` on the device: kernels, not syncs).

Only the step's own value types are walked (:data:`STEP_TYPES`): a segment's ``pool`` (the adapters' weight stacks)
and anything else stays as it is. The pinned buffer is reused across steps; before it is rewritten the previous
step's copy is waited for (long done by then: every step ends in the sampler's device → host read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

from loraplex.server.lora.mapping import LoraMapping, LoraSegment
from loraplex.server.lora.ops import PaddedGroups, SlotWindow
from loraplex.server.model.attention import AttentionPlan
from loraplex.server.model.forward import StepBatch

STEP_TYPES = (StepBatch, AttentionPlan, LoraMapping, LoraSegment, SlotWindow, PaddedGroups)

T = TypeVar("T")


def _collect(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, tuple):
        for item in value:
            _collect(item, out)
    elif isinstance(value, STEP_TYPES):
        for field in dataclasses.fields(value):
            _collect(getattr(value, field.name), out)


def _rebuild(value: Any, pieces: Iterator[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return next(pieces)
    if isinstance(value, tuple):
        return tuple(_rebuild(item, pieces) for item in value)
    if isinstance(value, STEP_TYPES):
        changes = {field.name: _rebuild(getattr(value, field.name), pieces) for field in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


class StepUpload:
    """Moves a step's value (a :class:`StepBatch` or any of :data:`STEP_TYPES`, built on the host) to ``device``
    with one copy. On a CPU device nothing moves (the host tensors are the step's), unless ``pack`` asks for the
    packing anyway (what tests check the round trip with)."""

    def __init__(self, device: torch.device, pack: bool | None = None) -> None:
        self.device = device
        self.pack = device.type != "cpu" if pack is None else pack
        self._pin = device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.long)
        self._copied: torch.cuda.Event | None = None
        self.copies = 0  # host → device copies made, since start

    def _buffer(self, size: int) -> torch.Tensor:
        if self._copied is not None:
            # done long ago in practice; query() is no host sync, synchronize() is
            if not self._copied.query():  # type: ignore[no-untyped-call]
                self._copied.synchronize()
            self._copied = None
        if self._host.numel() < size:
            grown = torch.empty(max(size, 2 * self._host.numel(), 1024), dtype=torch.long)
            self._host = grown.pin_memory() if self._pin else grown
        return self._host[:size]

    def __call__(self, value: T) -> T:
        if not self.pack:
            return value
        tensors: list[torch.Tensor] = []
        _collect(value, tensors)
        if not tensors:
            return value
        sizes = [tensor.numel() for tensor in tensors]
        host = self._buffer(sum(sizes))
        torch.cat([tensor.reshape(-1).to(torch.long) for tensor in tensors], out=host)
        packed = host.to(self.device, non_blocking=True)
        if self._pin:
            self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._copied.record()
        elif packed.data_ptr() == host.data_ptr():
            packed = packed.clone()  # the host buffer is rewritten next step
        self.copies += 1
        pieces = (
            piece.view(tensor.shape).to(tensor.dtype)
            for piece, tensor in zip(torch.split(packed, sizes), tensors, strict=True)
        )
        rebuilt: T = _rebuild(value, pieces)
        return rebuilt
