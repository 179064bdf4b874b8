"""Audio bytes -> fixed-size model windows.

One responsibility: take a decoded file (`decoders.open_reader`: bytes from a tar member or a file),
conform its channel count, resample it to the model rate and cut it into ``sample_size`` windows --
the same windows stable-audio-tools' ``pre_encode.py`` would see (``PadCrop_Normalized_T`` after load +
resample + ``Mono``/``Stereo``), but reading only the source frames each window needs, so a two-hour
FLAC cropped to 30 s costs 30 s of decoding, not two hours.

Nothing here keeps module-level state, so it is safe in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torchaudio.functional as AF

from .decoders import AUDIO_EXTENSIONS, AudioDecodeError, AudioReader, LengthChanged, open_reader

CHUNKING_MODES: tuple[str, ...] = ("crop", "random_crop", "split", "full")

# torchaudio.functional.resample defaults (stable-audio-tools uses them too).
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99


@dataclass(frozen=True)
class Stitch:
    """Where one chunk of a chunk-encoded file (`--chunking full --overlap N`) goes in the file's single
    latent sequence: `file[..., dst_start:dst_start + length] = chunk[..., src_start:src_start + length]`.

    The chunks are those of Stable Audio 3's `AudioAutoencoder.encode_audio(chunked=True)` (see
    `plan_chunks`); each chunk keeps the frames SA3's in-order writes leave to it, so the chunks may be
    placed in any order and give SA3's result.
    """

    index: int           # 0-based chunk of the file
    count: int           # chunks of the file
    offset: int          # first sample of the chunk in the file (a multiple of `ratio`)
    valid: int           # real samples in the chunk (the last one may end in the ratio padding)
    fresh: int           # samples of the file this chunk is the first to cover (they add up to the file's length)
    frames: int          # latent frames of the whole file: ceil(total / ratio)
    dst_start: int       # first frame of the file this chunk fills...
    src_start: int       # ...from this frame of the chunk's own latents...
    length: int          # ...for this many frames (>= 1)
    chunk_frames: int    # latent frames per chunk
    overlap: int         # latent frames neighbouring chunks share
    ratio: int           # samples per latent frame


def _describe(*, channels: int, sample_rate: int, source_sample_rate: int, source_channels: int, offset: int,
              valid: int, total: int, size: int, chunk_index: int, num_chunks: int) -> dict:
    """JSON-native description of a window, with stable-audio-tools' timing conditioning fields."""
    sr = sample_rate
    # Same normalisation as PadCrop_Normalized_T: positions are fractions of
    # (upper_bound + sample_size), i.e. max(total, sample_size).
    upper_bound = max(0, total - size)
    denom = upper_bound + size
    return {
        "audio_channels": int(channels),
        "sample_rate": int(sr),
        "source_sample_rate": int(source_sample_rate),
        "source_channels": int(source_channels),
        "duration": total / sr,
        "start_time": offset / sr,
        "end_time": (offset + valid) / sr,
        "seconds_start": int(offset // sr),
        "seconds_total": int(-(-total // sr)),
        "timestamps": [offset / denom, min(offset + size, denom) / denom],
        "chunk_index": int(chunk_index),
        "num_chunks": int(num_chunks),
        "valid_length": int(valid),
        "total_length": int(total),
        "offset": int(offset),
    }


@dataclass(frozen=True)
class Resampling:
    """A window still at its source rate (resampled on the device, `pipeline/resampling.py`): its audio is
    the source frames the resampler's kernel reaches, and resampling them to the target rate and keeping
    samples [skip, skip + valid), zero-padded to `size`, gives the window the workers would have made."""

    source_rate: int
    skip: int
    valid: int
    size: int


@dataclass(frozen=True, eq=False)
class Window:
    """One model-input window cut from a file, plus where it came from."""

    audio: torch.Tensor  # float32 [channels, sample_size], zeros after valid_length
    offset: int  # first sample of the window in the whole file, at the target rate
    valid_length: int  # real (non-padding) samples in the window, >= 1
    total_length: int  # length of the whole file at the target rate
    chunk_index: int  # 0-based
    num_chunks: int
    sample_rate: int  # target rate
    source_sample_rate: int
    source_channels: int
    stitch: Optional[Stitch] = None  # a chunk of a chunk-encoded file (--overlap): where its latents go
    delay_unknown: bool = False  # the stream may begin with encoder priming nothing records (raw ADTS AAC)
    resampling: Optional[Resampling] = None  # `audio` is still at the source rate: see Resampling

    @property
    def sample_size(self) -> int:
        return self.resampling.size if self.resampling is not None else int(self.audio.shape[-1])

    @property
    def padding_mask(self) -> torch.Tensor:
        """bool [sample_size], True on real audio (the encoder resizes it to latent length)."""
        return torch.arange(self.sample_size) < self.valid_length

    def metadata(self) -> dict:
        """JSON-native description of the output window this window becomes, with stable-audio-tools'
        timing conditioning fields. A chunk of a chunk-encoded file is part of one output window that
        covers the whole file (offset 0, the file's length, chunk 0 of 1), which also records how it was
        encoded: `chunk_frames`, `overlap` and `encoded_chunks`."""
        fields = dict(channels=int(self.audio.shape[0]), sample_rate=self.sample_rate,
                      source_sample_rate=self.source_sample_rate, source_channels=self.source_channels,
                      total=self.total_length)
        st = self.stitch
        if st is None:
            described = _describe(**fields, offset=self.offset, valid=self.valid_length, size=self.sample_size,
                                  chunk_index=self.chunk_index, num_chunks=self.num_chunks)
        else:
            described = {**_describe(**fields, offset=0, valid=self.total_length, size=st.frames * st.ratio,
                                     chunk_index=0, num_chunks=1),
                         "chunk_frames": st.chunk_frames, "overlap": st.overlap, "encoded_chunks": st.count}
        if self.delay_unknown:  # its times may be late by the encoder's priming (AAC: 1024 source samples)
            described["decoder_delay_unknown"] = True
        return described


# --------------------------------------------------------------------------- pure helpers


def conform_channels(audio: torch.Tensor, channels: int) -> torch.Tensor:
    """Force ``channels`` channels the way stable-audio-tools' Mono/Stereo transforms do.

    1 -> mean over channels; 2 -> mono repeated, more than 2 -> first two;
    other N -> unchanged if equal, mono repeated, else the first N.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    have = audio.shape[0]
    if channels == 1:
        return audio.mean(dim=0, keepdim=True)
    if have == channels:
        return audio
    if have == 1:
        return audio.repeat(channels, 1)
    if have > channels:
        return audio[:channels]
    raise ValueError(f"cannot make {channels} channels from {have}-channel audio")


def resample(audio: torch.Tensor, source_rate: int, target_rate: int) -> torch.Tensor:
    """torchaudio's sinc resampler with its defaults (what stable-audio-tools uses); no-op at equal rates."""
    if source_rate == target_rate:
        return audio
    return AF.resample(audio, int(source_rate), int(target_rate))


def _resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """Output length of ``resample`` for ``frames`` input frames.

    Mirrors torchaudio exactly, including its float32 ceil (which can be a
    sample short for very long files), so total_length matches a whole-file
    resample.
    """
    if source_rate == target_rate:
        return frames
    g = math.gcd(source_rate, target_rate)
    orig, new = source_rate // g, target_rate // g
    return int(torch.ceil(torch.as_tensor(new * frames / orig)).item())


def _resample_width(source_rate: int, target_rate: int) -> tuple[int, int, int]:
    """(orig, new, width): gcd-reduced rates and torchaudio's kernel half-width in source frames."""
    g = math.gcd(source_rate, target_rate)
    orig, new = source_rate // g, target_rate // g
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    return orig, new, width


def _random_offset(key: str, seed: int, upper_bound: int) -> int:
    """Deterministic crop offset in [0, upper_bound], so reruns and resumes pick the same window."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (upper_bound + 1)


def _window_offsets(total: int, sample_size: int, chunking: str, key: str, seed: int,
                    max_chunks: int | None) -> list[int]:
    if chunking == "crop":
        return [0]
    if chunking == "random_crop":
        return [_random_offset(key, seed, max(0, total - sample_size))]
    count = -(-total // sample_size)
    if max_chunks is not None:
        count = min(count, max_chunks)
    return [i * sample_size for i in range(count)]


def plan_chunks(total: int, chunk_samples: int, overlap: int, ratio: int) -> list[Stitch]:
    """The chunks of Stable Audio 3's `AudioAutoencoder.encode_audio(x, chunked=True, chunk_size, overlap)`
    for a file of `total` samples, x being the file zero-padded to a multiple of `ratio` (as SA3's
    `preprocess_audio_for_encoder` pads it); [] when x is shorter than one chunk (SA3 encodes it in one
    pass) or `overlap` is 0.

    Chunks of `chunk_samples` (chunk_size = chunk_samples / ratio frames) start every chunk_size - overlap
    frames; the last one is anchored to the end of x, so every chunk has the same length and lies inside
    x. SA3 writes the chunks in order into one sequence of len(x) / ratio frames, each chunk without the
    first overlap // 2 frames (but the first chunk) and without the last overlap // 2 (but the last
    chunk), a later chunk over an earlier one where they still meet (an odd overlap, the anchored last
    chunk); each `Stitch` says which frames of its chunk survive that, and where they go.
    """
    if overlap <= 0:
        return []
    if ratio < 1 or chunk_samples < ratio or chunk_samples % ratio:
        raise ValueError(f"chunk of {chunk_samples} samples is not a whole number of latent frames of {ratio}")
    chunk = chunk_samples // ratio
    if overlap >= chunk:
        raise ValueError(f"overlap {overlap} must be smaller than the chunk, {chunk} latent frames")
    frames = -(-total // ratio)
    if frames < chunk:
        return []
    half = overlap // 2
    starts = list(range(0, frames - chunk + 1, chunk - overlap))
    if starts[-1] != frames - chunk:
        starts.append(frames - chunk)
    count = len(starts)
    first = [s + (half if i else 0) for i, s in enumerate(starts)]           # SA3's out_start + left
    stop = [s + (chunk - half if i < count - 1 else chunk) for i, s in enumerate(starts)]  # out_start + right
    plan, covered = [], 0
    for i, s in enumerate(starts):
        end = min(stop[i], first[i + 1]) if i < count - 1 else stop[i]   # the next chunk overwrites the rest
        offset = s * ratio
        reach = min(offset + chunk_samples, total)
        plan.append(Stitch(index=i, count=count, offset=offset, valid=reach - offset, fresh=reach - covered,
                           frames=frames, dst_start=first[i], src_start=first[i] - s, length=end - first[i],
                           chunk_frames=chunk, overlap=overlap, ratio=ratio))
        covered = reach
    return plan


def plan_windows(total: int, sample_size: int, chunking: str, *, key: str = "", seed: int = 0,
                 max_chunks: int | None = None, length_multiple: int = 1,
                 overlap: int = 0) -> list[tuple[int, int, int]]:
    """(offset, valid samples, window size) of each window of a file of `total` samples.

    crop / random_crop / split windows are `sample_size` long, zero-padded after the audio. `full`
    windows hold the whole file (a file longer than `sample_size` is split into windows of that
    length) at its own length, rounded up to `length_multiple` (the model's downsampling ratio):
    the only padding is that rounding. `full` with `overlap` (latent frames): a file at least
    `sample_size` long (after that rounding) is cut into the overlapping chunks of `plan_chunks`
    instead, all `sample_size` long, whose latents make one sequence.
    """
    if chunking == "full" and overlap:
        chunks = plan_chunks(total, sample_size, overlap, length_multiple)
        if chunks:
            return [(c.offset, c.valid, sample_size) for c in chunks]
    plan = []
    for offset in _window_offsets(total, sample_size, "split" if chunking == "full" else chunking, key, seed,
                                  max_chunks):
        valid = min(sample_size, total - offset)
        size = -(-valid // length_multiple) * length_multiple if chunking == "full" else sample_size
        plan.append((offset, valid, size))
    return plan


def _check_finite(audio: torch.Tensor, what: str) -> None:
    """AudioDecodeError on a NaN or infinite sample. A sum is finite only when every term is (NaN and
    infinities carry through it), and costs one pass without a mask; only a sum that overflowed (samples
    near float32's limit, in a float WAV) needs the sample-by-sample check."""
    if math.isfinite(float(audio.sum())):
        return
    if not bool(torch.isfinite(audio).all()):
        raise AudioDecodeError(f"non-finite samples (NaN/Inf) in {what}")


def _norm_ext(ext: str) -> str:
    return (ext or "").lower().lstrip(".")


# --------------------------------------------------------------------------- windows


def _source_range(offset: int, valid: int, source_rate: int, target_rate: int) -> tuple[int, int, int]:
    """(start, end, skip): the source frames [start, end) whose resampling kernel reaches target samples
    [offset, offset + valid), aligned to the resampler's block grid, and where those samples begin in the
    resampled segment; resampling the segment then equals (up to float rounding) the same slice of a
    whole-file resample."""
    if source_rate == target_rate:
        start, end, skip = offset, offset + valid, 0
    else:
        orig, new, width = _resample_width(source_rate, target_rate)
        # Output block m (target samples m*new .. m*new+new-1) reads source frames
        # [m*orig - width, m*orig + orig + width). Start on a block boundary so the
        # segment's output grid coincides with the whole file's.
        first_block = offset // new
        last_block = -(-(offset + valid) // new)
        lead_blocks = -(-width // orig) + 1
        start_block = max(0, first_block - lead_blocks)
        start = start_block * orig
        end = (last_block + 1) * orig + width + 1
        skip = offset - start_block * new
    return start, end, skip


def _source_segment(reader: AudioReader, offset: int, valid: int, channels: int, target_rate: int
                    ) -> tuple[torch.Tensor, int]:
    """The conformed source frames target samples [offset, offset+valid) need, float32 [channels, n], and
    where those samples begin once the segment is resampled."""
    start, end, skip = _source_range(offset, valid, reader.sample_rate, target_rate)
    source = reader.read(start, end)
    return conform_channels(torch.from_numpy(np.ascontiguousarray(source)), channels), skip   # its own copy


def _render(reader: AudioReader, offset: int, valid: int, channels: int, target_rate: int) -> torch.Tensor:
    """Target-rate samples [offset, offset+valid) of the conformed file, as float32 [channels, valid],
    from only the source frames the resampler's kernel reaches (`_source_range`)."""
    segment, skip = _source_segment(reader, offset, valid, channels, target_rate)
    audio = resample(segment, reader.sample_rate, target_rate)[:, skip:skip + valid]
    if audio.shape[1] != valid:
        raise AudioDecodeError(f"decoded {audio.shape[1]} of {valid} samples for window at {offset}")
    return audio


def _validate(sample_rate: int, channels: int, sample_size: int, chunking: str,
              max_chunks: int | None, length_multiple: int, overlap: int = 0) -> None:
    if chunking not in CHUNKING_MODES:
        raise ValueError(f"chunking must be one of {CHUNKING_MODES}, got {chunking!r}")
    if sample_rate < 1 or channels < 1 or sample_size < 1 or length_multiple < 1:
        raise ValueError("sample_rate, channels, sample_size and length_multiple must be >= 1")
    if sample_size % length_multiple:
        raise ValueError(f"sample_size {sample_size} is not a multiple of length_multiple {length_multiple}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1 or None, got {max_chunks}")
    if overlap:
        if chunking != "full":
            raise ValueError(f"overlap works with chunking 'full' only, got {chunking!r}")
        if overlap < 0 or overlap >= sample_size // length_multiple:
            raise ValueError(f"overlap {overlap} must be in [0, {sample_size // length_multiple}) latent frames "
                             "(the chunk)")
        if max_chunks is not None:
            raise ValueError("max_chunks and overlap exclude each other (a chunk-encoded file is one window)")


def iter_windows(data: bytes, *, ext: str, sample_rate: int, channels: int, sample_size: int,
                 chunking: str = "crop", key: str = "", seed: int = 0,
                 max_chunks: int | None = None, length_multiple: int = 1, overlap: int = 0,
                 check_duration: Optional[Callable[[float], None]] = None, resample_here: bool = True
                 ) -> Iterator[Window]:
    """Decode ``data`` lazily into model windows.

    ``crop``: one window from the start; ``random_crop``: one window at an
    offset derived from (seed, key), stable across runs; ``split``: back-to-back
    windows covering the file, the last zero-padded; ``full``: the file at its own
    length rounded up to ``length_multiple`` (split into ``sample_size`` windows if
    longer; see `plan_windows`); ``full`` with ``overlap`` (latent frames): a file of at
    least ``sample_size`` samples comes as the overlapping chunks of `plan_chunks`, each
    window's `stitch` saying where its latents go. Opening errors raise here; per-window
    errors (e.g. non-finite samples) raise while iterating. ``check_duration`` is called with the
    file's length in seconds once it is opened, before any window is decoded (it raises to skip it).
    ``resample_here=False``: a file at another rate comes as its windows' source frames (`Resampling`).
    """
    _validate(sample_rate, channels, sample_size, chunking, max_chunks, length_multiple, overlap)
    ext = _norm_ext(ext)
    # A plain crop reads from frame 0 without seeking; don't seek an MP3 just to check its length.
    reader = open_reader(data, ext, check_end=chunking != "crop",
                         whole=chunking in ("split", "full") and max_chunks is None)
    have = reader.channels
    if channels not in (1, 2) and 1 < have < channels:
        reader.close()
        raise AudioDecodeError(f"cannot make {channels} channels from {have}-channel .{ext} audio")
    if check_duration is not None:
        try:
            check_duration(reader.frames / reader.sample_rate)
        except BaseException:
            reader.close()
            raise
    return _generate(reader, ext=ext, sample_rate=sample_rate, channels=channels, sample_size=sample_size,
                     chunking=chunking, key=key, seed=seed, max_chunks=max_chunks, length_multiple=length_multiple,
                     overlap=overlap, resample_here=resample_here)


def _generate(reader: AudioReader, *, ext: str, sample_rate: int, channels: int, sample_size: int, chunking: str,
              key: str, seed: int, max_chunks: int | None, length_multiple: int,
              overlap: int = 0, resample_here: bool = True) -> Iterator[Window]:
    with reader:
        yielded = False
        while True:  # re-plans (before the first yield) if the header over-stated the length
            total = _resampled_length(reader.frames, reader.sample_rate, sample_rate)
            if total <= 0:
                raise AudioDecodeError(f"no audio frames in .{ext} data")
            plan = plan_windows(total, sample_size, chunking, key=key, seed=seed, max_chunks=max_chunks,
                                length_multiple=length_multiple, overlap=overlap)
            stitches = plan_chunks(total, sample_size, overlap, length_multiple) if chunking == "full" else []
            try:
                for index, (offset, valid, size) in enumerate(plan):
                    resampling = None
                    if resample_here or reader.sample_rate == sample_rate:
                        audio = _render(reader, offset, valid, channels, sample_rate)
                    else:
                        audio, skip = _source_segment(reader, offset, valid, channels, sample_rate)
                        resampling = Resampling(reader.sample_rate, skip, valid, size)
                    _check_finite(audio, f"window {index} of .{ext} audio")
                    if valid < size and resampling is None:
                        padded = audio.new_zeros((channels, size))
                        padded[:, :valid] = audio
                        audio = padded
                    yielded = True
                    yield Window(audio=audio.contiguous(), offset=offset, valid_length=valid,
                                 total_length=total, chunk_index=index, num_chunks=len(plan),
                                 sample_rate=sample_rate, source_sample_rate=reader.sample_rate,
                                 source_channels=reader.channels, delay_unknown=reader.delay_unknown,
                                 stitch=stitches[index] if stitches else None, resampling=resampling)
                return
            except LengthChanged:
                if yielded:
                    raise AudioDecodeError(
                        f".{ext} stream ends at frame {reader.frames}, before its header said") from None
                if reader.frames <= 0:
                    raise AudioDecodeError(f"no audio frames in .{ext} data") from None


def decode_audio(data: bytes, ext: str) -> tuple[torch.Tensor, int]:
    """Whole file as float32 [channels, frames] at its own rate (reference path for tests/verify)."""
    ext = _norm_ext(ext)
    with open_reader(data, ext, check_end=False, whole=True) as reader:
        for _ in range(2):
            try:
                source = reader.read(0, reader.frames)
                break
            except LengthChanged:
                continue
        else:
            raise AudioDecodeError(f"inconsistent length in .{ext} data")
        if source.shape[1] == 0:
            raise AudioDecodeError(f"no audio frames in .{ext} data")
        audio = torch.from_numpy(np.ascontiguousarray(source))
        _check_finite(audio, f".{ext} audio")
        return audio, reader.sample_rate
