"""PyAV (FFmpeg's libraries, carried in its wheel), the decoder for what libsndfile cannot open: AAC in
M4A/MP4/MOV or raw ADTS, Opus and Vorbis in WebM/Matroska, WMA, AC-3, and the audio stream of a video
container.

FFmpeg already drops what the container says to drop at the start: AAC priming an MP4 edit list
records, Opus pre-skip, Vorbis' first block. At the end, an MP4's declared duration is where the audio
stops (the rest of the last AAC frame is padding), so `frames` is that duration and reads stop there.
A raw ADTS stream records neither: its priming stays, and the reader says so (`delay_unknown`).

A file is decoded front to back, with one decoder thread: DataLoader workers are the parallelism, and
FFmpeg's own thread pool beside them oversubscribes the cores (and has deadlocked in forked workers).
Runs in DataLoader workers; keeps no module-level state.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Iterator, Optional

import av
import numpy as np

from .base import KEEP_BYTES, AudioDecodeError, LengthChanged

EXTENSIONS: tuple[str, ...] = ("wv", "tta", "caf", "m4a", "m4b", "aac", "mp2", "mka", "webm", "wma", "ac3",
                               "mp4", "mov", "m4v", "3gp", "mkv", "avi", "flv")

# A file whose length the container does not record exactly is decoded once to count its frames; up to
# KEEP_BYTES of decoded audio is kept from that pass, so a short file is decoded once, a long one twice.
# Demuxers whose stream duration is the audio's exact length in samples (ISO BMFF: the edit list, or
# the media duration), less the priming they tell the decoder to drop.
_EXACT_DURATION_DEMUXERS = frozenset({"mov", "mp4", "m4a"})
# A read further ahead than this seeks (where timestamps are sample numbers) rather than decoding on,
# from this much before it (the preroll after which the decoder's state is whole again).
SEEK_AHEAD_SECONDS = 10.0
SEEK_PREROLL_SECONDS = 1.0
# (demuxer, codec) that record no encoder priming: raw ADTS AAC, AAC and MPEG audio in FLV and AVI, raw MP2.
# (MP4/MOV/M4A edit lists, Matroska's CodecDelay, Opus pre-skip and LAME headers do record it.)
_UNRECORDED_DELAY = frozenset({("aac", "aac"), ("flv", "aac"), ("avi", "aac"), ("avi", "mp2"), ("avi", "mp3"),
                               ("mp3", "mp2")})
# Integer sample formats and the scale that maps them to [-1, 1), as libsndfile's float reads do.
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_array(frame: av.AudioFrame, channels: int) -> np.ndarray:
    """A decoded frame as float32 [channels, samples]. AAC, Opus and Vorbis decode to planar floats:
    each plane is copied straight in (PyAV's to_ndarray stacks them through NumPy's generic vstack, a
    third of the decode's time on 1024-sample AAC frames)."""
    samples = frame.samples
    name = frame.format.name
    if name == "fltp":
        out = np.empty((channels, samples), dtype=np.float32)
        for channel, plane in enumerate(_float_planes(frame)):
            out[channel] = plane
        return out
    data = frame.to_ndarray()
    name = name.rstrip("p")
    data = data if frame.format.is_planar else data.reshape(-1, channels).T
    if name in _INT_SCALE:
        scale = _INT_SCALE[name]
        data = data.astype(np.float32)
        if name == "u8":
            data -= scale
        data /= scale
        return data
    return data.astype(np.float32, copy=False)


def _float_planes(frame: av.AudioFrame) -> list[np.ndarray]:
    """A planar float frame's channels, each a view of the frame's own memory (copy before it goes)."""
    return [np.frombuffer(plane, dtype=np.float32, count=frame.samples) for plane in frame.planes]


class _SeekFailed(Exception):
    """A seek gave no usable timestamp; the read is done again from the file's start."""


class PyAVReader:
    """Reads source frame ranges [start, stop) of the first audio stream of a container, in one pass.

    Reads move forward through the file (the windows are cut in order); a read's frames, and those decoded
    past its end, are kept for the next, which may start within them (a resampler's lead); a read that
    starts before them decodes the file again from its start. In an MP4/M4A/MOV, whose timestamps count
    samples, a read far ahead (a random crop of a long file) seeks instead, to a second before it.
    """

    def __init__(self, data: bytes, ext: str):
        self._data = data
        self._ext = ext
        self._container, self._stream = self._open()
        context = self._stream.codec_context
        self.sample_rate = int(context.sample_rate or 0)
        self.channels = int(context.channels or 0)
        demuxer = self._container.format.name.split(",")[0]
        self.delay_unknown = (demuxer, context.name.removesuffix("float")) in _UNRECORDED_DELAY  # mp2float: mp2
        self._whole: Optional[np.ndarray] = None   # the whole file, when it was decoded to count it
        self._frames_iter: Optional[Iterator[av.AudioFrame]] = None
        self._pos = 0                               # frames the current pass has decoded
        self._kept: list[np.ndarray] = []          # frames [_pos - their length, _pos), [channels, n] each
        self._resync = False                        # after a seek: take _pos from the next frame's timestamp
        declared = self._declared_frames()
        try:
            self.frames = declared if declared is not None else self._count()
        except BaseException:   # undecodable: let the demuxer go now, not when it is collected
            self.close()
            raise
        # seek by timestamp where a timestamp is a sample number
        self._seekable = declared is not None and self._stream.time_base == Fraction(1, self.sample_rate)

    # -- lifecycle
    def _open(self):
        try:
            container = av.open(io.BytesIO(self._data), mode="r")
        except Exception as exc:  # FFmpeg's errors, and whatever the demuxer probe raises
            raise AudioDecodeError(f"cannot decode .{self._ext} audio: FFmpeg says {exc}") from exc
        if not container.streams.audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            container.close()
            raise AudioDecodeError(f"no audio stream in .{self._ext} data (it holds {kinds})")
        stream = container.streams.audio[0]
        stream.codec_context.thread_count = 1
        return container, stream

    def close(self) -> None:
        self._frames_iter = None
        self._container.close()

    def __enter__(self) -> "PyAVReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _restart(self) -> None:
        """Decode from the first frame again, through a fresh demuxer and decoder."""
        self.close()
        self._container, self._stream = self._open()
        self._pos = 0
        self._kept = []

    # -- decoding
    def _decoded(self) -> Iterator[av.AudioFrame]:
        try:
            for frame in self._container.decode(self._stream):
                if frame.layout.nb_channels != self.channels:
                    raise AudioDecodeError(f".{self._ext} audio changes from {self.channels} to "
                                           f"{frame.layout.nb_channels} channels at frame {self._pos}")
                if frame.samples:
                    yield frame
        except AudioDecodeError:
            raise
        except Exception as exc:  # FFmpeg's errors: a corrupt packet, a truncated file
            raise AudioDecodeError(f"cannot decode .{self._ext} audio at frame {self._pos}: {exc}") from exc

    def _next_frame(self) -> Optional[av.AudioFrame]:
        if self._frames_iter is None:
            self._frames_iter = self._decoded()
        frame = next(self._frames_iter, None)
        if frame is not None:
            if self._resync:   # the first frame after a seek: where it is, its timestamp says
                self._resync = False
                if frame.pts is None:
                    raise _SeekFailed()
                self._pos = int(frame.pts)
            self._pos += frame.samples
        return frame

    def _seek(self, start: int) -> None:
        """Decode on from a second before `start`: the decoder's state (an AAC frame overlaps the one
        before it) is whole again by then, and that second is discarded by `read`."""
        target = max(0, start - int(SEEK_PREROLL_SECONDS * self.sample_rate))
        self._frames_iter = None
        self._container.seek(target, stream=self._stream, backward=True)
        self._pos, self._kept, self._resync = target, [], True

    def _declared_frames(self) -> Optional[int]:
        """The stream's length in samples where its container records it exactly, else None."""
        stream = self._stream
        if not _EXACT_DURATION_DEMUXERS & set(self._container.format.name.split(",")):
            return None
        if not stream.duration or not stream.time_base or self.sample_rate <= 0:
            return None
        frames = Fraction(stream.duration) * stream.time_base * self.sample_rate
        return int(frames) if frames.denominator == 1 and frames > 0 else None

    def _count(self) -> int:
        """Frames in the stream, by decoding it; the samples are kept when they fit in KEEP_BYTES."""
        kept: Optional[list[np.ndarray]] = []
        size = 0
        while (frame := self._next_frame()) is not None:
            if kept is not None:
                block = _frame_array(frame, self.channels)
                kept.append(block)
                size += block.nbytes
                if size > KEEP_BYTES:
                    kept = None
        total = self._pos
        if kept is None:
            self._restart()
        else:  # every read is a slice of this from now on: the demuxer is done
            self._whole = np.concatenate(kept, axis=1) if kept else np.zeros((self.channels, 0), np.float32)
            self.close()
        return total

    # -- public
    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, min(stop, frames)) as float32 [channels, n], contiguous: each decoded frame is
        copied once, straight into it."""
        stop = min(stop, self.frames)
        if stop <= start:
            return np.zeros((self.channels, 0), dtype=np.float32)
        if self._whole is not None:
            return self._whole[:, start:stop]
        try:
            return self._read(start, stop)
        except _SeekFailed:   # no timestamp, or one past where we asked: from the start, without seeking
            self._seekable = False
            self._restart()
            return self._read(start, stop)

    def _read(self, start: int, stop: int) -> np.ndarray:
        kept_start = self._pos - sum(piece.shape[1] for piece in self._kept)
        far = self._seekable and start > SEEK_AHEAD_SECONDS * self.sample_rate
        if far and (start < kept_start or start - self._pos > SEEK_AHEAD_SECONDS * self.sample_rate):
            self._seek(start)
            kept_start = self._pos
        elif start < kept_start:
            self._restart()
            kept_start = 0
        out = np.empty((self.channels, stop - start), dtype=np.float32)
        filled, at, beyond = 0, kept_start, []
        for piece in self._kept:                      # what the last read decoded, this one may overlap
            lo, hi = max(start, at), min(stop, at + piece.shape[1])
            if hi > lo:
                out[:, filled:filled + hi - lo] = piece[:, lo - at:hi - at]
                filled += hi - lo
            if at + piece.shape[1] > stop:
                beyond.append(piece[:, max(0, stop - at):])
            at += piece.shape[1]
        while self._pos < stop:
            frame = self._next_frame()
            if frame is None:  # the stream ends before the container said
                self.frames = self._pos
                raise LengthChanged()
            frame_start = self._pos - frame.samples
            if frame_start > start + filled:   # a seek landed past the frames this read needs
                raise _SeekFailed()
            lo, hi = max(start, frame_start), min(stop, self._pos)
            if hi <= lo:
                continue
            if frame.format.name == "fltp" and self._pos <= stop:   # the common case: planes straight in
                for channel, plane in enumerate(_float_planes(frame)):
                    out[channel, filled:filled + hi - lo] = plane[lo - frame_start:]
            else:
                block = _frame_array(frame, self.channels)
                out[:, filled:filled + hi - lo] = block[:, lo - frame_start:hi - frame_start]
                if self._pos > stop:
                    beyond.append(block[:, stop - frame_start:])
            filled += hi - lo
        self._kept = [out, *beyond]   # frames [start, _pos): the next read may start within them
        return out


def open_pyav(data: bytes, ext: str) -> PyAVReader:
    """A reader over `data` with its length established; AudioDecodeError when FFmpeg cannot read it."""
    return PyAVReader(data, ext)
