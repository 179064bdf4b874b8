"""Windows -> batches of one window length; a unit's end is let through only after all its windows.

A batch stacks windows into one [B, C, N] tensor, so its windows must have one length. With fixed
windows (crop, split) that is every window, and a batch is simply the next `batch_size` windows.
With `--chunking full` each file has its own length; padding a batch to its longest window would
feed the encoder zeros that change a non-causal encoder's latents. So windows wait in one bucket
per length, and a bucket leaves as a batch when it holds `batch_size` windows. At most `buffer`
windows wait in all (memory stays bounded): when the buffer is full, the fullest bucket leaves as
a smaller batch (the oldest, among equally full ones).

The writer commits a unit when its end marker arrives, so an end must follow every batch that holds
one of the unit's windows: `LengthBatcher` keeps an end back while any of its unit's windows wait.
"""

from __future__ import annotations

from typing import Union

from .reader import ShardEnd, WindowItem

Released = Union[list[WindowItem], ShardEnd]   # a batch to encode, or a unit end to commit after it


class LengthBatcher:
    """Feed it windows (`add`) and unit ends (`end`); each returns what may go on, in order."""

    def __init__(self, batch_size: int, buffer: int):
        if batch_size < 1 or buffer < 1:
            raise ValueError(f"batch_size ({batch_size}) and buffer ({buffer}) must be >= 1")
        self.batch_size = batch_size
        self.buffer = max(buffer, batch_size)
        self.buckets: dict[int, list[WindowItem]] = {}   # by window length; dicts keep the oldest first
        self.held = 0
        self.waiting: dict[str, int] = {}                  # unit -> its windows in the buckets
        self.ends: list[ShardEnd] = []                     # ends held back, in arrival order

    def add(self, item: WindowItem) -> list[Released]:
        length = item.size
        bucket = self.buckets.setdefault(length, [])
        bucket.append(item)
        self.held += 1
        self.waiting[item.shard_id] = self.waiting.get(item.shard_id, 0) + 1
        if len(bucket) >= self.batch_size:
            return self._release(length)
        if self.held >= self.buffer:
            fullest = max(self.buckets, key=lambda n: len(self.buckets[n]))  # max keeps the first (oldest) of ties
            return self._release(fullest)
        return []

    def end(self, end: ShardEnd) -> list[Released]:
        if self.waiting.get(end.shard.shard_id):
            self.ends.append(end)
            return []
        return [end]

    def drain(self) -> list[Released]:
        """Everything still waiting, as (smaller) batches in bucket order, with the ends they free."""
        out: list[Released] = []
        while self.buckets:
            out.extend(self._release(next(iter(self.buckets))))
        out.extend(self.ends)
        self.ends = []
        return out

    @property
    def pending_units(self) -> set[str]:
        return {unit for unit, count in self.waiting.items() if count}

    def _release(self, length: int) -> list[Released]:
        batch = self.buckets.pop(length)
        self.held -= len(batch)
        for item in batch:
            self.waiting[item.shard_id] -= 1
        free = [e for e in self.ends if not self.waiting.get(e.shard.shard_id)]
        self.ends = [e for e in self.ends if self.waiting.get(e.shard.shard_id)]
        for end in free:
            self.waiting.pop(end.shard.shard_id, None)
        return [batch, *free]
