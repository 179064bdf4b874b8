"""libsndfile, the decoder for what it reads well: WAV, FLAC, AIFF, MP3, Ogg Vorbis and Opus.

`SoundFileReader` decodes source frame ranges on demand, seeking where the format allows it, so a crop
of a long file decodes only the crop. Runs in DataLoader workers; keeps no module-level state.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

import numpy as np
import soundfile as sf

from .base import KEEP_BYTES, AudioDecodeError, LengthChanged

EXTENSIONS: tuple[str, ...] = ("flac", "wav", "aiff", "aif", "mp3", "ogg", "oga", "opus")

# Frames decoded per read when skipping or counting, so memory stays bounded.
_BLOCK_FRAMES = 1 << 16
# libsndfile reports SF_COUNT_MAX-like values when the length is unknown.
_UNKNOWN_FRAMES = 1 << 62
# Lossy decoders (MP3's bit reservoir, Vorbis/Opus overlap) produce wrong
# samples for a while after a seek, so a read that needs a seek starts this far
# before the wanted frame and the extra frames are discarded. Measured worst case with libsndfile 1.2.2 is
# ~4500 frames (MP3, 44.1 kHz, low-bitrate tone); one second is ample.
_LOSSY_PREROLL_SECONDS = 1.0
_MIN_LOSSY_PREROLL = 8192
# Containers/codecs whose seek is sample-exact in libsndfile (no preroll needed).
_EXACT_SEEK_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF", "AU", "CAF", "IRCAM", "NIST"})
_EXACT_SEEK_SUBTYPE_PREFIXES = ("PCM_", "FLOAT", "DOUBLE", "ULAW", "ALAW")
# Any mid-file seek in an MP3 makes libmpg123 print harmless bit-reservoir errors
# to stderr. A plain crop never seeks, so there the declared length is trusted
# (and checked lazily by short reads) instead of verified by seeking to the end.
_NOISY_SEEK_FORMATS = frozenset({"MP3"})


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null while C code runs (Python's own stderr is untouched)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to redirect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class SoundFileReader:
    """Reads source frame ranges [start, stop) from bytes through libsndfile, bounded in memory.

    Reads go through libsndfile's own sf_readf_float (`_read_on`), so a range that starts where the
    last one ended is decoded on, with the decoder's state intact. A range elsewhere seeks: libsndfile's
    MP3 decoder restarts on every seek (bit reservoir lost: a few thousand wrong samples), so for lossy
    codecs such a read starts ``preroll`` frames early and the preroll is discarded; sample-exact formats
    (PCM, FLAC) seek or skip directly. Non-seekable streams are read sequentially, block by block. A
    file that will be read whole (`probe(whole=True)`) is decoded at once and read from memory. The
    last range is kept so overlapping window contexts (split) are not decoded twice.
    """

    def __init__(self, data: bytes, ext: str, file: sf.SoundFile):
        self._data = data
        self._ext = ext
        self._file = file
        # libsndfile's own read: python-soundfile's read() seeks to where it already is after every call,
        # which restarts the FLAC and MP3 decoders (a frame decoded again, or the bit reservoir lost)
        self._readf = getattr(getattr(sf, "_snd", None), "sf_readf_float", None) if hasattr(file, "_file") else None
        self.sample_rate = int(file.samplerate)
        self.channels = int(file.channels)
        fmt, subtype = str(file.format), str(file.subtype)
        exact = fmt in _EXACT_SEEK_FORMATS and subtype.startswith(_EXACT_SEEK_SUBTYPE_PREFIXES)
        lossy_preroll = max(_MIN_LOSSY_PREROLL, int(self.sample_rate * _LOSSY_PREROLL_SECONDS))
        self._preroll = 0 if exact else lossy_preroll
        self._seekable = bool(file.seekable())
        self._pos = 0
        self._cache: np.ndarray | None = None
        self._cache_start = 0
        self._fmt = fmt
        self._whole: np.ndarray | None = None   # the whole file, when probe() decoded it
        self.frames = -1  # set by probe(), which may decode
        self.delay_unknown = False  # libmpg123 drops the MP3 priming its LAME/Xing header records

    def probe(self, check_end: bool, whole: bool = False) -> None:
        """Establish the frame count (``check_end``: also seek-verify noisy formats like MP3). ``whole``:
        every frame will be read, so a file of at most KEEP_BYTES decoded is decoded now, in one pass,
        and read from memory: no seek at all, the length is what the decoder gave."""
        with self._quiet():
            declared = int(self._file.frames)
            if whole and 0 < declared < _UNKNOWN_FRAMES and declared * self.channels * 4 <= KEEP_BYTES:
                self._whole = self._decode_all(declared)
                self.frames = len(self._whole)
                return
            self.frames = self._initial_frames(self._fmt, check_end)

    def _decode_all(self, declared: int) -> np.ndarray:
        """Every frame from the start: the declared count in one call, then whatever follows it."""
        blocks = [self._decode(declared + 1)]
        if len(blocks[0]) > declared:   # more than the header said: read on to the end
            while len(block := self._decode(_BLOCK_FRAMES)):
                blocks.append(block)
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)

    def _quiet(self):
        """Silence libmpg123's harmless after-seek messages, which users would read as errors."""
        return _native_stderr_silenced() if self._fmt in _NOISY_SEEK_FORMATS else contextlib.nullcontext()

    # -- lifecycle
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SoundFileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reopen(self) -> None:
        self._file.close()
        self._file = sf.SoundFile(io.BytesIO(self._data))
        self._pos = 0
        self._cache = None

    # -- decoding primitives (every libsndfile failure becomes AudioDecodeError)
    def _decode(self, frames: int) -> np.ndarray:
        try:
            out = self._read_on(frames)
        except Exception as exc:  # libsndfile raises several types; callers only see ours
            raise AudioDecodeError(
                f"cannot decode .{self._ext} audio at frame {self._pos}: {exc}") from exc
        self._pos += len(out)
        return out

    def _read_on(self, frames: int) -> np.ndarray:
        """The next `frames` frames, from where the decoder is (`_readf`; without it, python-soundfile's
        read(), after which the decoder has restarted)."""
        if self._readf is None:
            return self._file.read(frames, dtype="float32", always_2d=True)
        out = np.empty((frames, self.channels), dtype=np.float32)
        got = self._readf(self._file._file, sf._ffi.cast("float *", out.ctypes.data), frames)
        sf._error_check(self._file._errorcode)
        return out[:got]

    def _seek(self, frame: int) -> bool:
        """Seek to ``frame``; on failure switch to sequential reading (from a fresh decoder)."""
        if not self._seekable:
            return False
        try:
            self._file.seek(frame)
        except Exception:
            self._seekable = False
            self._reopen()
            return False
        self._pos = frame
        return True

    def _skip(self, frames: int) -> bool:
        """Decode and discard ``frames``; False if the stream ended first."""
        while frames > 0:
            got = len(self._decode(min(frames, _BLOCK_FRAMES)))
            if got == 0:
                return False
            frames -= got
        return True

    def _count(self) -> int:
        """Exact frame count by decoding the whole stream once, block by block (samples unused)."""
        self._reopen()
        total = 0
        while True:
            got = len(self._decode(_BLOCK_FRAMES))
            if got == 0:
                break
            total += got
        self._reopen()
        return total

    def _initial_frames(self, fmt: str, check_end: bool) -> int:
        declared = int(self._file.frames)
        if not self._seekable or declared <= 0 or declared >= _UNKNOWN_FRAMES:
            return self._count()
        if fmt in _NOISY_SEEK_FORMATS and not check_end:
            return declared  # verified lazily by short reads (see _fetch)
        # Cheap end check: the last declared frame must exist and be the last one.
        try:
            self._file.seek(declared - 1)
            self._pos = declared - 1
            tail = self._decode(2)
            if len(tail) == 1:
                return declared
        except Exception:
            pass
        return self._count()

    def _length_changed(self) -> None:
        declared = self.frames
        self.frames = self._count()
        if self.frames == declared:  # the stream is as long as declared, yet a read came up short
            raise AudioDecodeError(f"cannot read .{self._ext} audio consistently (seek failed)")
        raise LengthChanged()

    def _fetch(self, begin: int, stop: int) -> np.ndarray:
        """Decode frames [begin, stop) (stop <= frames), preroll included unless the decoder is already
        at `begin` (the next window of a split file: its state runs on, nothing is decoded twice)."""
        continuous = begin == self._pos and self._readf is not None   # no seek since the last read
        target = begin if continuous else begin - min(self._preroll, begin)
        gap = target - self._pos
        if self._seekable and gap != 0 and (self._preroll or gap < 0 or gap > _BLOCK_FRAMES):
            self._seek(target)  # on failure: reopened at frame 0, read sequentially below
        if target < self._pos:
            self._reopen()
        if not self._skip(target - self._pos):
            self._length_changed()
        out = self._decode(stop - target)
        if len(out) < stop - target:
            self._length_changed()
        return out[begin - target:]

    # -- public
    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, min(stop, frames)) as float32 [channels, n] (a view of libsndfile's interleaved
        frames: the caller's copy makes it contiguous)."""
        stop = min(stop, self.frames)
        want = max(0, stop - start)
        if want == 0:
            return np.zeros((self.channels, 0), dtype=np.float32)
        if self._whole is not None:
            return self._whole[start:stop].T
        parts = []
        cache = self._cache
        if cache is not None and self._pos == self._cache_start + len(cache) \
                and self._cache_start <= start < self._pos:
            parts.append(cache[start - self._cache_start:stop - self._cache_start])
            begin = min(stop, self._pos)
        else:
            begin = start
        if begin < stop:
            with self._quiet():
                parts.append(self._fetch(begin, stop))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if len(out) != want:
            raise AudioDecodeError(f"internal read error in .{self._ext} audio")
        self._cache, self._cache_start = out, start
        return out.T


def open_sndfile(data: bytes, ext: str, check_end: bool, whole: bool = False) -> SoundFileReader:
    """A reader over `data` with its length established; `sf.LibsndfileError` (or another exception of
    python-soundfile's) when libsndfile cannot open it at all, AudioDecodeError when it opens but breaks."""
    file = sf.SoundFile(io.BytesIO(data))
    try:
        reader = SoundFileReader(data, ext, file)
    except BaseException:
        file.close()
        raise
    try:
        reader.probe(check_end, whole)
    except BaseException:
        reader.close()
        raise
    return reader
