"""One progress display for the whole job, shown by rank 0 alone.

Every rank adds its counts to the job's store (`ProgressCounter`, throttled); rank 0 reads the
sums (`ProgressMonitor`) and shows them: a redrawn bar when stderr is a terminal, else a plain line
every `interval` seconds, which reads well in batch and SLURM logs. Progress is measured in input
bytes, known from the listing before any audio is decoded, so the percentage and the ETA stay
honest when files differ in length.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, TextIO

from tqdm import tqdm

PUBLISH_SECONDS = 0.5   # how often a rank sends its counts at most
BAR_SECONDS = 0.5       # how often a terminal bar is redrawn


@dataclass
class ProgressTotals:
    """What the job has to do, known before it starts."""

    bytes: int                 # input bytes of the units to encode in this run
    units: int                 # units in the dataset
    units_before: int          # units already done by an earlier run


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_fields(counts: Mapping[str, int], totals: ProgressTotals, elapsed: float) -> dict:
    """Percentage, ETA, units, windows, audio hours and real-time factor from the summed counters."""
    done = counts.get("bytes", 0)
    fraction = min(1.0, done / totals.bytes) if totals.bytes else 1.0
    eta = elapsed / done * (totals.bytes - done) if done and totals.bytes > done else (0.0 if fraction >= 1 else None)
    audio_seconds = counts.get("audio_ms", 0) / 1000
    return {"percent": 100 * fraction, "eta": eta, "bytes": done,
            "units": totals.units_before + counts.get("units", 0), "windows": counts.get("windows", 0),
            "audio_hours": audio_seconds / 3600, "rtf": audio_seconds / elapsed if elapsed > 0 else 0.0,
            "errors": counts.get("errors", 0)}


def format_line(counts: Mapping[str, int], totals: ProgressTotals, elapsed: float) -> str:
    """The plain progress line written to logs."""
    f = progress_fields(counts, totals, elapsed)
    eta = format_duration(f["eta"]) if f["eta"] is not None else "?"
    errors = f" | {f['errors']} errors" if f["errors"] else ""
    return (f"wds-encode: {f['percent']:5.1f}% ({format_bytes(f['bytes'])} of {format_bytes(totals.bytes)}) | "
            f"units {f['units']}/{totals.units} | windows {f['windows']} | audio {f['audio_hours']:.3f} h | "
            f"{f['rtf']:.0f}x real time{errors} | elapsed {format_duration(elapsed)}, ETA {eta}")


class ProgressDisplay:
    """A tqdm bar on a terminal; otherwise a line per `interval` seconds (and one at the end)."""

    def __init__(self, totals: ProgressTotals, *, interval: float, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None):
        self.totals = totals
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.period = BAR_SECONDS if self.tty else interval
        self.started = time.monotonic()
        self._last: Mapping[str, int] = {}
        self._bar = None
        if self.tty:
            self._bar = tqdm(total=totals.bytes, unit="B", unit_scale=True, desc="encoding", file=self.stream,
                             dynamic_ncols=True, smoothing=0.05)

    def show(self, counts: Mapping[str, int]) -> None:
        self._last = dict(counts)
        elapsed = time.monotonic() - self.started
        if self._bar is None:
            print(format_line(counts, self.totals, elapsed), file=self.stream, flush=True)
            return
        f = progress_fields(counts, self.totals, elapsed)
        self._bar.update(max(0, f["bytes"] - self._bar.n))
        self._bar.set_postfix_str(f"units {f['units']}/{self.totals.units}, windows {f['windows']}, "
                                  f"{f['audio_hours']:.3f} h, {f['rtf']:.0f}x", refresh=True)

    def close(self, counts: Optional[Mapping[str, int]] = None) -> None:
        if counts is not None:
            self.show(counts)
        if self._bar is not None:
            self._bar.close()


class ProgressMonitor(threading.Thread):
    """Rank 0's thread: read the job's summed counters every `display.period` and show them."""

    def __init__(self, display: ProgressDisplay, read: Callable[[], Mapping[str, int]]):
        super().__init__(name="wds-encode-progress", daemon=True)
        self.display = display
        self.read = read
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.display.period):
            try:
                self.display.show(self.read())
            except Exception:  # the store is gone: the main loop reports why
                return

    def stop(self, final: bool = True) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        counts = None
        if final:
            try:
                counts = self.read()
            except Exception:
                counts = None
        self.display.close(counts)


class ProgressCounter:
    """A rank's counts since its last report, sent to the job at most every PUBLISH_SECONDS."""

    def __init__(self, publish: Callable[[Mapping[str, int]], None]):
        self.publish = publish
        self.pending: dict[str, int] = {}
        self._sent = time.monotonic()
        self._lock = threading.Lock()  # the main thread counts windows, the writer thread units

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self.pending[key] = self.pending.get(key, 0) + int(value)
            due = time.monotonic() - self._sent >= PUBLISH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self.pending = self.pending, {}
            self._sent = time.monotonic()
        if pending:
            self.publish(pending)
