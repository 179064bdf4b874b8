"""A few page-locked host buffers, reused batch after batch, for copies to a CUDA device.

A copy to the GPU overlaps with compute only from page-locked (pinned) memory. A fresh pinned
batch per submit, with about ten batches in flight, keeps ~10 GiB page-locked per rank at batch
64 of 30 s windows, and PyTorch's host caching allocator never gives it back. Instead the main
loop collates each batch into one of `slots` buffers and the batch holds it until its latents are
collected (a low-precision batch may be re-run in fp32 from it until then). When every slot is
in flight, `acquire` waits: that also bounds how many batches are queued on the device, which is
a few more than the one it is computing.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

DEFAULT_SLOTS = 4


class PinnedSlot:
    """One buffer of the ring, viewed as a batch of one shape."""

    def __init__(self, ring: "PinnedRing", index: int, tensor: torch.Tensor):
        self.ring = ring
        self.index = index
        self.tensor = tensor

    def release(self) -> None:
        self.ring.release(self)


class PinnedRing:
    """`slots` pinned buffers; each grows to the largest batch it has held (one allocation per size
    step, not per batch)."""

    def __init__(self, slots: int = DEFAULT_SLOTS, pin: bool = True):
        if slots < 1:
            raise ValueError("a pinned ring needs at least one slot")
        self.slots = slots
        self.pin = pin
        self._buffers: list[Optional[torch.Tensor]] = [None] * slots
        self._free = list(range(slots))
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.slots - len(self._free)

    def pinned_bytes(self) -> int:
        """Host memory the ring holds page-locked now."""
        return sum(b.numel() for b in self._buffers if b is not None)

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype, timeout: Optional[float] = None
                ) -> Optional[PinnedSlot]:
        """A free buffer viewed as `shape`, waiting up to `timeout` seconds for one (None: timed out)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                return None
            index = self._free.pop(0)
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < nbytes:
            self._buffers[index] = None  # let the old buffer go before the new one is allocated
            buffer = self._buffers[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return PinnedSlot(self, index, buffer[:nbytes].view(dtype).view(shape))

    def release(self, slot: PinnedSlot) -> None:
        with self._cond:
            if slot.index in self._free:
                raise RuntimeError(f"pinned slot {slot.index} released twice")
            self._free.append(slot.index)
            self._cond.notify()
