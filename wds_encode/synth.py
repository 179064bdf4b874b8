"""Synthetic but real audio datasets, for ``wds-encode demo`` and the tests.

Everything is generated from a seed (one independent RNG stream per sample
index), encoded in memory into real files -- FLAC/WAV/MP3/Ogg through libsndfile,
AAC (M4A, MP4 with a video stream, MOV, raw ADTS), Opus in WebM, FLAC in Matroska
and WMA through PyAV's FFmpeg encoders -- and written as WebDataset tar shards or
an audio folder. Same seed, same bytes: the one random field libsndfile puts into
Ogg files (the stream serial number) is replaced by a constant, and FFmpeg's
muxers write bit-exact output.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf

KINDS: tuple[str, ...] = ("tone", "chord", "sweep", "noise", "pluck", "silence-padded")

# ext -> (libsndfile container, subtype)
_ENCODINGS = {
    "flac": ("FLAC", "PCM_16"),
    "wav": ("WAV", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
# ext -> (FFmpeg muxer, audio encoder, bit rate) for what libsndfile cannot write; `mp4` also gets a video stream.
_FFMPEG_ENCODINGS = {
    "m4a": ("ipod", "aac", 192_000),
    "mp4": ("mp4", "aac", 192_000),
    "mov": ("mov", "aac", 192_000),
    "aac": ("adts", "aac", 192_000),
    "webm": ("webm", "libopus", 160_000),
    "mka": ("matroska", "flac", None),
    "wma": ("asf", "wmav2", 192_000),
}
# Rates the encoders accept: MPEG-1/2/2.5 layer III, and Opus' internal rates.
MP3_RATES: tuple[int, ...] = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OPUS_RATES: tuple[int, ...] = (8000, 12000, 16000, 24000, 48000)

_VIDEO_FPS = 25
_PEAK = 0.9
_FADE_SECONDS = 0.005
_OGG_SERIAL = 0x57445345  # "WDSE"; constant so Ogg output is byte-reproducible
_TAR_MTIME = 1_700_000_000  # fixed so shards are byte-reproducible
_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


@dataclass(frozen=True)
class SynthSample:
    key: str
    ext: str
    sample_rate: int
    channels: int
    frames: int
    kind: str  # one of KINDS


# --------------------------------------------------------------------------- waveforms


def _note_name(freq: float) -> str:
    midi = int(round(69 + 12 * np.log2(freq / 440.0)))
    return f"{_NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def _smooth(x: np.ndarray, cutoff: float, sample_rate: int) -> np.ndarray:
    """Moving-average low-pass: crude, but vectorised and plenty for "coloured noise"."""
    length = max(1, int(sample_rate / max(cutoff, 1.0)))
    if length == 1:
        return x
    kernel = np.ones(length) / length
    return np.stack([np.convolve(x[:, c], kernel, mode="same") for c in range(x.shape[1])], axis=1)


def _synth(kind: str, seconds: float, sample_rate: int, channels: int,
           rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Waveform float32 [N, C] and the parameters that describe it (for prompts/metadata)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if channels < 1 or sample_rate < 1:
        raise ValueError("channels and sample_rate must be >= 1")
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n, dtype=np.float64) / sample_rate
    freq = float(110.0 * 2 ** rng.uniform(0, 4))  # 110 Hz .. 1.76 kHz
    # Per-channel gain and phase so stereo channels differ (downmix tests mean something).
    gains = rng.uniform(0.6, 1.0, channels)
    phases = rng.uniform(0, 2 * np.pi, channels)
    params: dict = {"frequency": round(freq, 3)}

    def osc(f, phase):
        return np.sin(2 * np.pi * f * t + phase)

    if kind == "tone":
        cols = [osc(freq, p) + 0.2 * osc(2 * freq, 2 * p) for p in phases]
        text = f"a sustained sine tone at {freq:.0f} Hz ({_note_name(freq)})"
    elif kind == "chord":
        ratios = (1.0, 2 ** (4 / 12), 2 ** (7 / 12))  # major triad
        cols = [sum(osc(freq * r, p * (i + 1)) for i, r in enumerate(ratios)) for p in phases]
        note = _note_name(freq)
        text = f"{'an' if note[0] in 'AEF' else 'a'} {note} major chord"
    elif kind == "sweep":
        f_end = float(min(sample_rate * 0.45, freq * 2 ** rng.uniform(1, 3)))
        duration = max(t[-1], 1.0 / sample_rate)
        k = np.log(f_end / freq) / duration
        phase_t = 2 * np.pi * freq * np.expm1(k * t) / k if k != 0 else 2 * np.pi * freq * t
        cols = [np.sin(phase_t + p) for p in phases]
        params["frequency_end"] = round(f_end, 3)
        text = f"a rising sine sweep from {freq:.0f} Hz to {f_end:.0f} Hz"
    elif kind == "noise":
        common = rng.standard_normal(n)
        cols = [0.7 * common + 0.3 * rng.standard_normal(n) for _ in range(channels)]
        colored = _smooth(np.stack(cols, axis=1), freq * 4, sample_rate)
        cols = list(colored.T)
        params["frequency"] = round(freq * 4, 3)  # cutoff of the smoothing filter
        text = f"soft filtered noise below {freq * 4:.0f} Hz"
    elif kind == "pluck":
        rate = float(rng.uniform(2.0, 6.0))
        envelope = np.exp(-((t * rate) % 1.0) * 6.0)
        cols = [envelope * (osc(freq, p) + 0.5 * osc(3 * freq, p)) for p in phases]
        params["notes_per_second"] = round(rate, 3)
        text = f"repeated plucked notes at {freq:.0f} Hz, {rate:.1f} per second"
    else:  # silence-padded
        lead, tail = rng.uniform(0.1, 0.3, 2)
        gate = ((t >= lead * t[-1]) & (t <= (1 - tail) * t[-1])).astype(np.float64)
        cols = [gate * osc(freq, p) for p in phases]
        text = f"a {freq:.0f} Hz tone surrounded by silence"

    audio = np.stack(cols, axis=1) * gains[None, :]
    fade = min(n // 2, int(_FADE_SECONDS * sample_rate))
    if fade > 0:  # avoid clicks, which lossy codecs render poorly
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)[:, None]
        audio[:fade] *= ramp
        audio[n - fade:] *= ramp[::-1]
    peak = float(np.max(np.abs(audio)))
    target = float(rng.uniform(0.5, _PEAK))
    if peak > 0:
        audio *= target / peak
    params["peak"] = round(target if peak > 0 else 0.0, 4)
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels} channels")
    params["text"] = f"{text}, {layout}"
    return np.clip(audio, -_PEAK, _PEAK).astype(np.float32), params


def synth_waveform(kind: str, seconds: float, sample_rate: int, channels: int,
                   rng: np.random.Generator) -> np.ndarray:
    """A float32 [N, C] waveform of the given kind, peak <= 0.9, N = round(seconds * rate) (>= 1)."""
    return _synth(kind, seconds, sample_rate, channels, rng)[0]


# --------------------------------------------------------------------------- encoding


def _ogg_crc_table() -> list[int]:
    """Ogg page CRC-32 table (poly 0x04C11DB7, no reflection, init 0)."""
    table = []
    for i in range(256):
        crc = i << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
        table.append(crc & 0xFFFFFFFF)
    return table


_OGG_CRC_TABLE: tuple[int, ...] = tuple(_ogg_crc_table())


def _fixed_ogg_serial(data: bytes) -> bytes:
    """Replace libsndfile's random Ogg stream serial number with a constant and re-CRC each page."""
    out = bytearray(data)
    pos = 0
    table = _OGG_CRC_TABLE
    while pos + 27 <= len(out) and out[pos:pos + 4] == b"OggS":
        segments = out[pos + 26]
        header_len = 27 + segments
        body_len = sum(out[pos + 27:pos + header_len])
        end = pos + header_len + body_len
        if end > len(out):
            break
        out[pos + 14:pos + 18] = _OGG_SERIAL.to_bytes(4, "little")
        out[pos + 22:pos + 26] = b"\0\0\0\0"
        crc = 0
        for byte in memoryview(out)[pos:end]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
        out[pos + 22:pos + 26] = crc.to_bytes(4, "little")
        pos = end
    return bytes(out)


def encode_audio_bytes(audio: np.ndarray, sample_rate: int, ext: str) -> bytes:
    """Encode float [N, C] (or [N]) audio to a real file in memory.

    libsndfile: flac/wav are 16-bit PCM, ogg is Vorbis, mp3 is MPEG layer III, opus is
    Ogg/Opus (which only accepts 8/12/16/24/48 kHz; use 48k so nothing is
    resampled inside the codec). PyAV (FFmpeg's encoders): m4a/mp4/mov/aac are AAC
    (mp4 with a small video stream beside it, aac raw ADTS), webm is Opus (48 kHz),
    mka is FLAC in Matroska, wma is WMA v2 (at most 48 kHz).
    """
    ext = ext.lower().lstrip(".")
    if ext in _FFMPEG_ENCODINGS:
        if ext == "webm" and sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus needs one of {OPUS_RATES} Hz (use 48000), got {sample_rate}")
        return _encode_with_ffmpeg(np.asarray(audio, dtype=np.float32), sample_rate, ext)
    if ext not in _ENCODINGS:
        raise ValueError(f"cannot encode .{ext}; supported: {tuple(_ENCODINGS) + tuple(_FFMPEG_ENCODINGS)}")
    if ext == "mp3" and sample_rate not in MP3_RATES:
        raise ValueError(f"MP3 needs one of {MP3_RATES} Hz, got {sample_rate}")
    if ext == "opus" and sample_rate not in OPUS_RATES:
        raise ValueError(f"Opus needs one of {OPUS_RATES} Hz (use 48000), got {sample_rate}")
    container, subtype = _ENCODINGS[ext]
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, dtype=np.float32), sample_rate, format=container, subtype=subtype)
    data = buffer.getvalue()
    return _fixed_ogg_serial(data) if container == "OGG" else data


def _encode_with_ffmpeg(audio: np.ndarray, sample_rate: int, ext: str) -> bytes:
    import av  # only here: the demo's libsndfile formats need no FFmpeg

    muxer, codec, bit_rate = _FFMPEG_ENCODINGS[ext]
    planar = np.ascontiguousarray((audio[:, None] if audio.ndim == 1 else audio).T)   # [C, N]
    layout = {1: "mono", 2: "stereo"}.get(planar.shape[0])
    if layout is None:
        raise ValueError(f"cannot encode {planar.shape[0]} channels as .{ext}; give 1 or 2")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer, options={"fflags": "+bitexact"}) as container:
        video = None
        if ext == "mp4":  # as video2dataset's shards hold it: the audio beside a video stream
            video = container.add_stream("mpeg4", rate=_VIDEO_FPS)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, 0
        frame.time_base = Fraction(1, sample_rate)
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout=layout,
                                      rate=sample_rate)
        packets = []
        for converted in resampler.resample(frame) + resampler.resample(None):
            packets += stream.encode(converted)
        packets += stream.encode(None)
        if video is not None:
            frames = max(1, round(planar.shape[1] / sample_rate * _VIDEO_FPS))
            for index in range(frames):
                picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
                picture.pts = index
                packets += video.encode(picture)
            packets += video.encode(None)
        for packet in packets:
            container.mux(packet)
    return buffer.getvalue()


# --------------------------------------------------------------------------- datasets


def _pick_rate(ext: str, rate: int) -> int:
    if ext in ("opus", "webm"):
        return 48000
    if ext == "mp3" and rate not in MP3_RATES:
        return min(MP3_RATES, key=lambda r: abs(r - rate))
    return rate


def _make_one(index: int, key: str, *, seed: int, formats: Sequence[str], rates: Sequence[int],
              channels: Sequence[int], min_seconds: float,
              max_seconds: float) -> tuple[SynthSample, bytes, dict]:
    if "." in key or "/" in key:
        raise ValueError(f"sample keys must not contain '.' or '/': {key!r}")
    # One RNG stream per index: sample i is the same whatever n or shard layout.
    rng = np.random.default_rng([int(seed), int(index)])
    ext = formats[index % len(formats)].lower().lstrip(".")  # cycle, so few samples cover all formats
    rate = _pick_rate(ext, int(rng.choice(list(rates))))
    n_channels = int(rng.choice(list(channels)))
    seconds = float(rng.uniform(min_seconds, max_seconds))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    audio, params = _synth(kind, seconds, rate, n_channels, rng)
    data = encode_audio_bytes(audio, rate, ext)
    sample = SynthSample(key=key, ext=ext, sample_rate=rate, channels=n_channels, frames=int(audio.shape[0]),
                         kind=kind)
    metadata = {
        "text": params.pop("text"),
        "kind": kind,
        **params,
        "seconds": audio.shape[0] / rate,
        "sample_rate": rate,
        "channels": n_channels,
        "frames": int(audio.shape[0]),
        "format": ext,
    }
    return sample, data, metadata


def _check_options(formats: Sequence[str], rates: Sequence[int], channels: Sequence[int],
                   min_seconds: float, max_seconds: float) -> None:
    if not formats or not rates or not channels:
        raise ValueError("formats, rates and channels must be non-empty")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError("need 0 < min_seconds <= max_seconds")


def make_sample_set(n: int, *, seed: int = 0, formats: Iterable[str] = ("flac", "wav", "mp3", "ogg"),
                    rates: Iterable[int] = (16000, 22050, 32000, 44100, 48000),
                    channels: Iterable[int] = (1, 2),
                    min_seconds: float = 0.3, max_seconds: float = 3.0,
                    key_prefix: str = "sample") -> list[tuple[SynthSample, bytes, dict]]:
    """``n`` encoded samples: (description, file bytes, JSON metadata with a "text" prompt).

    Formats cycle in order; rate, channels, length and kind come from the seed.
    """
    opts = dict(formats=tuple(formats), rates=tuple(rates), channels=tuple(channels),
                min_seconds=min_seconds, max_seconds=max_seconds)
    _check_options(**opts)
    return [_make_one(i, f"{key_prefix}-{i:06d}", seed=seed, **opts) for i in range(n)]


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_tar_shards(out_dir, num_shards: int, samples_per_shard: int, *, seed: int = 0, name: str = "demo",
                     **kw) -> tuple[list[Path], list[SynthSample]]:
    """WebDataset shards ``{name}-000000.tar`` ... holding ``KEY.EXT`` + ``KEY.json`` per sample.

    Keys are ``{name}-{shard:06d}-{i:06d}`` (unique across shards, no dots).
    ``kw``: formats, rates, channels, min_seconds, max_seconds as in make_sample_set.
    """
    opts = dict(formats=tuple(kw.pop("formats", ("flac", "wav", "mp3", "ogg"))),
                rates=tuple(kw.pop("rates", (16000, 22050, 32000, 44100, 48000))),
                channels=tuple(kw.pop("channels", (1, 2))),
                min_seconds=kw.pop("min_seconds", 0.3), max_seconds=kw.pop("max_seconds", 3.0))
    if kw:
        raise TypeError(f"unexpected options: {sorted(kw)}")
    _check_options(**opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    samples: list[SynthSample] = []
    for shard in range(num_shards):
        path = out / f"{name}-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(samples_per_shard):
                index = shard * samples_per_shard + i
                sample, data, metadata = _make_one(index, f"{name}-{shard:06d}-{i:06d}", seed=seed, **opts)
                _add_member(tar, f"{sample.key}.{sample.ext}", data)
                _add_member(tar, f"{sample.key}.json", json.dumps(metadata, sort_keys=True).encode("utf-8"))
                samples.append(sample)
        paths.append(path)
    return paths, samples


def folder_relpath(sample: SynthSample, index: int, nested: bool = True) -> Path:
    """Where write_audio_folder puts sample ``index``: two folder levels deep when nested."""
    filename = f"{sample.key}.{sample.ext}"
    if not nested:
        return Path(filename)
    return Path(f"group-{index % 3}") / f"part-{(index // 3) % 2}" / filename


def write_audio_folder(out_dir, n: int, *, seed: int = 0, nested: bool = True, **kw) -> list[SynthSample]:
    """Plain audio files (no sidecars) for audio_dir datasets; nested=True spreads them over subfolders."""
    out = Path(out_dir)
    samples = []
    for index, (sample, data, _) in enumerate(make_sample_set(n, seed=seed, **kw)):
        path = out / folder_relpath(sample, index, nested)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        samples.append(sample)
    return samples
