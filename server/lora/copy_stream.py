"""Host → device slot writes off the compute stream, ordered against the steps by events, never by a host sync.

A :class:`CopyStream` is where slot writes are enqueued and how they are ordered against the compute stream (the
engine thread's current stream, which runs the steps). Two forms, one code path:

- on CUDA (:class:`CudaCopyStream`): a dedicated side stream; the host weights are pinned, so each write is a
  ``non_blocking`` copy that runs while a step computes; events (``torch.cuda.Event``) order the two streams on the
  device (``wait_event``), the host never waits;
- elsewhere (:class:`CopyStream`): copies run at once on the caller's thread, events are complete when recorded and
  waits have nothing to wait for, so the CPU suite runs the same ordering logic.

:class:`SlotFences` keeps, per slot, the event of its last write and the event of the last step that read it:

- a step that reads a slot first makes the compute stream wait on that slot's write event (once: a write a step has
  waited for is forgotten, later steps come after it on the same stream);
- a write into a slot first makes the copy stream wait on the event of the last step that read it, so a slot is
  never overwritten while a step that reads it may still run (the step's event is recorded even if it failed);
- operations on whole stacks (a pool's creation, growth, compaction, cut) run on the compute stream after it waited
  for every copy, and the copy stream then waits for them: both tables start empty again.

The kernels of a step may read the stacks' slots between the ones it uses (a slot window) and discard what they
give; those are not fenced: a torn value read there is multiplied by zero rows or dropped, and two finite values'
bytes never make an Inf or NaN.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

_COMPLETE = object()  # the CPU form's event: complete when recorded


class CopyStream:
    """The CPU form: writes run on the caller's thread at once; an event is complete when recorded. Counts the
    waits it was asked for (``compute_waits``: a step waited for a write; ``copy_waits``: a write waited for a
    step), the same in both forms."""

    pins = False  # whether host weights should be pinned for this stream's copies

    def __init__(self) -> None:
        self.compute_waits = 0
        self.copy_waits = 0

    def copying(self) -> AbstractContextManager[object]:
        """The context a slot write's copies are enqueued in."""
        return nullcontext()

    def record_copy(self) -> object:
        """An event after every copy enqueued so far."""
        return _COMPLETE

    def record_compute(self) -> object:
        """An event after everything the compute stream was given so far."""
        return _COMPLETE

    def compute_wait(self, event: object) -> None:
        """The compute stream's next work starts after ``event`` (no host wait)."""
        self.compute_waits += 1

    def copy_wait(self, event: object) -> None:
        """The next copy starts after ``event`` (no host wait)."""
        self.copy_waits += 1

    def join(self) -> None:
        """The compute stream's next work starts after every copy enqueued so far."""

    def follow(self) -> None:
        """The next copy starts after everything the compute stream was given so far."""


class CudaCopyStream(CopyStream):
    """A dedicated CUDA stream for slot writes (copies from pinned host memory), ordered by CUDA events."""

    pins = True

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copying(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self.stream)

    def record_copy(self) -> object:
        return self.stream.record_event()

    def record_compute(self) -> object:
        return self._compute().record_event()

    def compute_wait(self, event: object) -> None:
        super().compute_wait(event)
        assert isinstance(event, torch.cuda.Event)
        self._compute().wait_event(event)

    def copy_wait(self, event: object) -> None:
        super().copy_wait(event)
        assert isinstance(event, torch.cuda.Event)
        self.stream.wait_event(event)

    def join(self) -> None:
        self._compute().wait_stream(self.stream)

    def follow(self) -> None:
        self.stream.wait_stream(self._compute())


def copy_stream_for(device: torch.device) -> CopyStream:
    """A side stream on CUDA; the current stream (no pinning, nothing to overlap) elsewhere."""
    return CudaCopyStream(device) if device.type == "cuda" else CopyStream()


class SlotFences:
    """Per slot (any hashable key, e.g. ``(pool, index)``): its write no step has waited for yet, and the last step
    that read it. Engine thread only."""

    def __init__(self, stream: CopyStream) -> None:
        self.stream = stream
        self._written: dict[Hashable, object] = {}
        self._read: dict[Hashable, object] = {}

    @contextmanager
    def writing(self, slot: Hashable) -> Iterator[None]:
        """Enqueues the copies made inside on the copy stream, after the last step that read ``slot``."""
        read = self._read.pop(slot, None)
        if read is not None:
            self.stream.copy_wait(read)
        with self.stream.copying():
            yield
        self._written[slot] = self.stream.record_copy()

    def settle(self, slot: Hashable) -> None:
        """The compute stream's next work comes after ``slot``'s last write (for readers outside a step)."""
        written = self._written.pop(slot, None)
        if written is not None:
            self.stream.compute_wait(written)

    @contextmanager
    def reading(self, slots: Iterable[Hashable]) -> Iterator[None]:
        """A step reading ``slots``: the compute work enqueued inside starts after their writes, and the slots'
        next writes wait for it."""
        read = set(slots)
        for slot in read:
            self.settle(slot)
        try:
            yield
        finally:
            if read:
                event = self.stream.record_compute()
                for slot in read:
                    self._read[slot] = event

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Work on whole stacks, on the compute stream: after every copy, and before any later one."""
        self.stream.join()
        self._written.clear()
        try:
            yield
        finally:
            self.stream.follow()
            self._read.clear()
