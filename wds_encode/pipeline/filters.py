"""Which files are skipped before any encoding: `--min-duration`, `--max-duration`, `--skip-silent`.

A skipped file is not an error: it is counted as `filtered` in the unit's record and the summary, and
listed in errors.jsonl at level `rejected` with the reason. The duration is the file's own (its source
frames over its source rate), known when it is opened, before a window is decoded; the level is that of
its loudest window, known once its windows are decoded (they are held until then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

REJECTED = "rejected"   # the level of a filtered file's line in errors.jsonl


class FileFiltered(Exception):
    """The file is skipped by a filter; the message says which, and why."""


@dataclass(frozen=True)
class FileFilters:
    min_duration: Optional[float] = None   # seconds; a shorter file is skipped
    max_duration: Optional[float] = None   # seconds; a longer file is skipped
    skip_silent: Optional[float] = None    # dBFS; a file whose loudest window's RMS stays below is skipped

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.min_duration, self.max_duration, self.skip_silent))

    def check_duration(self, seconds: float) -> None:
        """FileFiltered when a file of `seconds` is outside --min-duration / --max-duration."""
        if self.min_duration is not None and seconds < self.min_duration:
            raise FileFiltered(f"{seconds:.3f} s long, under --min-duration {self.min_duration:g} s")
        if self.max_duration is not None and seconds > self.max_duration:
            raise FileFiltered(f"{seconds:.3f} s long, over --max-duration {self.max_duration:g} s")

    def loud(self, level: float) -> bool:
        """Whether a window at `level` dBFS keeps its file (always, without --skip-silent)."""
        return self.skip_silent is None or level >= self.skip_silent

    def silent_reason(self, loudest: float) -> str:
        return f"silent: its loudest window is {loudest:.1f} dBFS, under --skip-silent {self.skip_silent:g} dBFS"


def window_level(audio: torch.Tensor, valid: int) -> float:
    """RMS level in dBFS of the first `valid` samples of a window [channels, samples], over all channels
    (a full-scale square wave is 0 dBFS, a full-scale sine -3); -inf for digital silence."""
    real = audio[:, :valid]
    mean_square = float(real.pow(2).mean()) if real.numel() else 0.0
    return 10 * math.log10(mean_square) if mean_square > 0 else -math.inf
