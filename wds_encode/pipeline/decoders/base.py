"""What every decoder backend gives the windowing code (`audio.py`), and the errors they raise."""

from __future__ import annotations

from typing import Protocol

import numpy as np

# A file that will be read whole is decoded whole, once, when its decoded audio is at most this (float32):
# reads are then slices of memory. A longer one is read range by range, within bounded memory.
KEEP_BYTES = 64 << 20


class AudioDecodeError(ValueError):
    """The data is not usable audio (undecodable, empty, non-finite, unsupported format)."""


class LengthChanged(Exception):
    """The decoder found fewer frames than the container declared; the reader's `frames` now holds the
    count it found, and the windows are planned anew."""


class AudioReader(Protocol):
    """Source frames of one file, decoded on demand.

    `frames` is the file's length as the container records it (priming and padding the container says to
    drop are not counted); `read(start, stop)` gives frames [start, min(stop, frames)) as float32
    [channels, n] (perhaps a view: copy it to keep it), raising `LengthChanged` when the stream ends early. `delay_unknown`: the stream may
    begin with encoder priming that nothing in it records (raw ADTS AAC), so its first frames may be
    silence the source did not have.
    """

    sample_rate: int
    channels: int
    frames: int
    delay_unknown: bool

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def close(self) -> None: ...

    def __enter__(self) -> "AudioReader": ...

    def __exit__(self, *exc) -> None: ...
