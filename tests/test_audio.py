"""wds_encode.pipeline.audio: decoding, conforming, resampling and windowing real encoded files."""

from __future__ import annotations

import io
import json
import math
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from wds_encode.pipeline.audio import (
    AUDIO_EXTENSIONS,
    AudioDecodeError,
    Window,
    conform_channels,
    decode_audio,
    iter_windows,
    plan_chunks,
    plan_windows,
    resample,
)
from wds_encode.synth import encode_audio_bytes, synth_waveform

LOSSLESS = ("wav", "flac")
LOSSY = ("mp3", "ogg", "opus")
# PCM_16 quantisation step: the most a lossless 16-bit round trip may differ by.
PCM16_TOL = 1.0 / 32768 + 1e-7


def make_audio(kind="chord", seconds=2.0, rate=44100, channels=2, seed=0):
    return synth_waveform(kind, seconds, rate, channels, np.random.default_rng(seed))


def encoded(ext, seconds=2.0, rate=44100, channels=2, kind="chord", seed=0):
    if ext == "opus":
        rate = 48000  # Ogg/Opus only takes 8/12/16/24/48 kHz; 48k avoids codec-internal resampling
    audio = make_audio(kind, seconds, rate, channels, seed)
    return audio, encode_audio_bytes(audio, rate, ext), rate


def reference(data, ext, sample_rate, channels):
    """Whole-file decode -> conform -> resample: what stable-audio-tools would crop from."""
    audio, rate = decode_audio(data, ext)
    return resample(conform_channels(audio, channels), rate, sample_rate)


def windows(data, ext, **kw):
    return list(iter_windows(data, ext=ext, **kw))


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("ext", LOSSLESS + LOSSY)
@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 2), (44100, 2), (48000, 1)])
def test_every_format_decodes_with_right_rate_channels_length(ext, rate, channels):
    source, data, rate = encoded(ext, seconds=1.3, rate=rate, channels=channels)
    audio, got_rate = decode_audio(data, ext)
    assert audio.dtype == torch.float32
    assert got_rate == rate
    assert audio.shape[0] == channels
    if ext in LOSSLESS:
        assert audio.shape[1] == source.shape[0]
        assert np.abs(audio.numpy().T - source).max() <= PCM16_TOL
    else:
        # Lossy codecs add encoder delay/padding (MP3: 576-1152 + 529 frames; Vorbis/Opus:
        # pre-skip). libsndfile 1.2.2 trims it exactly (LAME gapless tag, Ogg granule
        # positions), so lengths match here; allow one MP3 frame in case a build does not.
        assert abs(audio.shape[1] - source.shape[0]) <= 1152
        n = min(audio.shape[1], source.shape[0])
        got, want = audio.numpy().T[:n].ravel(), source[:n].ravel()
        # Same waveform, time-aligned: strong correlation at zero lag.
        assert np.corrcoef(got, want)[0, 1] > 0.9


def test_audio_extensions_constant():
    assert AUDIO_EXTENSIONS[:4] == ("flac", "wav", "aiff", "aif")   # lossless first
    assert {"m4a", "aac", "webm", "mka", "wma", "mp4", "mov"} <= set(AUDIO_EXTENSIONS)
    assert AUDIO_EXTENSIONS.index("m4a") < AUDIO_EXTENSIONS.index("mp4")  # audio-only before video containers


# --------------------------------------------------------------------------- conform / resample


def test_conform_channels_rules():
    stereo = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    mono = torch.tensor([[1.0, -1.0, 0.5]])
    six = torch.arange(12, dtype=torch.float32).reshape(6, 2)

    assert torch.equal(conform_channels(stereo, 1), torch.tensor([[2.0, 3.0, 4.0]]))
    assert torch.equal(conform_channels(mono, 1), mono)
    assert torch.equal(conform_channels(mono, 2), mono.repeat(2, 1))
    assert torch.equal(conform_channels(stereo, 2), stereo)
    assert torch.equal(conform_channels(six, 2), six[:2])
    assert torch.equal(conform_channels(six, 1), six.mean(dim=0, keepdim=True))
    assert torch.equal(conform_channels(six, 4), six[:4])
    assert torch.equal(conform_channels(mono, 3), mono.repeat(3, 1))
    assert torch.equal(conform_channels(six, 6), six)
    assert torch.equal(conform_channels(torch.tensor([1.0, 2.0]), 2), torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    with pytest.raises(ValueError):
        conform_channels(stereo, 3)  # no rule makes 3 channels out of 2
    with pytest.raises(ValueError):
        conform_channels(stereo, 0)


@pytest.mark.parametrize("src,dst", [
    (44100, 16000), (16000, 44100), (22050, 48000), (48000, 44100), (32000, 32000)])
@pytest.mark.parametrize("n", [1, 999, 44100])
def test_resample_lengths(src, dst, n):
    x = torch.randn(2, n)
    y = resample(x, src, dst)
    assert y.shape == (2, math.ceil(n * dst / src))
    if src == dst:
        assert y is x
    else:
        assert torch.equal(y, AF.resample(x, src, dst))


# --------------------------------------------------------------------------- windowing


def test_crop_wav_same_rate_is_exact_first_samples():
    source, data, rate = encoded("wav", seconds=2.0, rate=44100, channels=2)
    [w] = windows(data, "wav", sample_rate=44100, channels=2, sample_size=32768)
    full, _ = decode_audio(data, "wav")
    assert isinstance(w, Window)
    assert w.audio.shape == (2, 32768) and w.audio.dtype == torch.float32
    assert torch.equal(w.audio, full[:, :32768])
    assert (w.offset, w.valid_length, w.total_length, w.chunk_index, w.num_chunks) == (0, 32768, 88200, 0, 1)
    assert (w.source_sample_rate, w.source_channels, w.sample_rate) == (44100, 2, 44100)


@pytest.mark.parametrize("ext,src_rate,dst_rate,channels", [
    ("flac", 44100, 16000, 1),
    ("flac", 22050, 48000, 2),
    ("wav", 32000, 44100, 2),
    ("ogg", 32000, 44100, 1),
    ("mp3", 44100, 16000, 2),
    ("opus", 48000, 44100, 2),
])
def test_crop_matches_whole_file_decode_and_resample(ext, src_rate, dst_rate, channels):
    _, data, src_rate = encoded(ext, seconds=3.0, rate=src_rate, channels=2)
    size = dst_rate  # one second
    ref = reference(data, ext, dst_rate, channels)
    [w] = windows(data, ext, sample_rate=dst_rate, channels=channels, sample_size=size)
    assert w.total_length == ref.shape[1]
    assert w.valid_length == size
    # Only the first frames plus the resampler's context were decoded, yet the window
    # equals the whole-file result up to float rounding in the convolution.
    torch.testing.assert_close(w.audio, ref[:, :size], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ext", ["flac", "mp3", "ogg"])
def test_random_crop_deterministic_in_bounds_and_matches_reference(ext):
    _, data, rate = encoded(ext, seconds=3.0, rate=44100, channels=2)
    kw = dict(sample_rate=16000, channels=2, sample_size=8000, chunking="random_crop")
    ref = reference(data, ext, 16000, 2)
    total = ref.shape[1]
    offsets = set()
    for key in [f"key-{i}" for i in range(12)]:
        [w] = windows(data, ext, key=key, seed=7, **kw)
        [again] = windows(data, ext, key=key, seed=7, **kw)
        assert again.offset == w.offset
        assert torch.equal(again.audio, w.audio)
        assert 0 <= w.offset <= total - 8000
        assert w.valid_length == 8000
        # Seeking (with preroll for lossy codecs) gives the same samples as decoding everything.
        torch.testing.assert_close(w.audio, ref[:, w.offset:w.offset + 8000], atol=1e-4, rtol=0)
        offsets.add(w.offset)
    assert len(offsets) >= 10  # keys spread across the file
    [other_seed] = windows(data, ext, key="key-0", seed=8, **kw)
    [same_seed] = windows(data, ext, key="key-0", seed=7, **kw)
    assert other_seed.offset != same_seed.offset


@pytest.mark.parametrize("ext,src_rate,dst_rate", [
    ("flac", 22050, 44100),
    ("wav", 16000, 16000),
    ("mp3", 44100, 16000),
    ("mp3", 22050, 22050),
    ("ogg", 32000, 32000),
    ("opus", 48000, 16000),
])
def test_split_covers_file_exactly_once(ext, src_rate, dst_rate):
    _, data, src_rate = encoded(ext, seconds=2.7, rate=src_rate, channels=1)
    size = dst_rate // 2
    ref = reference(data, ext, dst_rate, 1)
    ws = windows(data, ext, sample_rate=dst_rate, channels=1, sample_size=size, chunking="split")
    total = ref.shape[1]
    assert len(ws) == math.ceil(total / size) == 6
    assert [w.offset for w in ws] == [i * size for i in range(len(ws))]
    assert [w.chunk_index for w in ws] == list(range(len(ws)))
    assert all(w.num_chunks == len(ws) and w.total_length == total for w in ws)
    assert sum(w.valid_length for w in ws) == total
    assert all(w.valid_length == size for w in ws[:-1])
    last = ws[-1]
    assert last.valid_length == total - 5 * size < size
    assert torch.all(last.audio[:, last.valid_length:] == 0)
    for w in ws:
        mask = w.padding_mask
        assert mask.dtype == torch.bool and mask.shape == (size,)
        assert int(mask.sum()) == w.valid_length and bool(mask[:w.valid_length].all())
    # Concatenated valid parts reproduce the whole-file resample (window edges included).
    joined = torch.cat([w.audio[:, :w.valid_length] for w in ws], dim=1)
    torch.testing.assert_close(joined, ref, atol=1e-5, rtol=0)


RATIO = 64   # a typical small downsampling ratio (the bundled demo model's)


@pytest.mark.parametrize("samples", [1, RATIO - 1, RATIO, RATIO + 1, 10007])   # 10007 is prime
def test_full_windows_hold_the_file_at_its_length_rounded_up_to_the_ratio(samples):
    audio = (0.1 * np.sin(np.arange(samples) / 7.0)).astype(np.float32)[:, None]
    data = encode_audio_bytes(audio, 44100, "wav")
    [w] = windows(data, "wav", sample_rate=44100, channels=1, sample_size=RATIO * 1000, chunking="full",
                  length_multiple=RATIO)
    assert w.valid_length == w.total_length == samples
    assert w.audio.shape == (1, math.ceil(samples / RATIO) * RATIO)      # the only padding: the rounding
    assert w.sample_size - samples < RATIO
    assert torch.all(w.audio[:, samples:] == 0)
    np.testing.assert_allclose(w.audio[0, :samples].numpy(), audio[:, 0], atol=PCM16_TOL)


def test_full_windows_of_a_resampled_file_round_its_resampled_length():
    _, data, _ = encoded("flac", seconds=1.2345, rate=48000, channels=2)
    ref = reference(data, "flac", 44100, 2)
    [w] = windows(data, "flac", sample_rate=44100, channels=2, sample_size=RATIO * 4096, chunking="full",
                  length_multiple=RATIO)
    assert w.valid_length == ref.shape[1] and w.sample_size == math.ceil(ref.shape[1] / RATIO) * RATIO
    torch.testing.assert_close(w.audio[:, :w.valid_length], ref, atol=1e-5, rtol=0)


def test_a_file_longer_than_the_longest_window_is_split_and_its_last_window_kept_short():
    _, data, _ = encoded("flac", seconds=2.5, rate=16000, channels=1)
    size = RATIO * 250   # 16000 samples: 1 s
    ws = windows(data, "flac", sample_rate=16000, channels=1, sample_size=size, chunking="full",
                 length_multiple=RATIO)
    assert [(w.offset, w.valid_length, w.sample_size) for w in ws] == [
        (0, size, size), (size, size, size), (2 * size, 8000, 8000 // RATIO * RATIO + RATIO * (8000 % RATIO > 0))]
    assert all(w.num_chunks == 3 and w.total_length == 40000 for w in ws)
    with pytest.raises(ValueError, match="not a multiple of length_multiple"):
        iter_windows(data, ext="flac", sample_rate=16000, channels=1, sample_size=size + 1, chunking="full",
                     length_multiple=RATIO)


def test_split_max_chunks_caps_windows():
    _, data, _ = encoded("flac", seconds=3.0, rate=16000, channels=1)
    ws = windows(data, "flac", sample_rate=16000, channels=1, sample_size=4000, chunking="split",
                 max_chunks=3)
    assert [w.offset for w in ws] == [0, 4000, 8000]
    assert all(w.num_chunks == 3 and w.total_length == 48000 for w in ws)


# --------------------------------------------------------------------------- overlapping chunks (--overlap)


def test_chunks_start_every_hop_and_the_last_is_anchored_to_the_end_of_the_padded_file():
    """SA3's encode_audio(chunked=True): chunk_size 83, overlap 31 (hop 52) over 250 frames -> starts 0, 52,
    104, 156 and the anchored 167 (= 250 - 83); the file is 5 samples short of 250 frames."""
    ratio, chunk, overlap = 32, 83, 31
    total = 250 * ratio - 5
    plan = plan_chunks(total, chunk * ratio, overlap, ratio)
    assert [c.offset // ratio for c in plan] == [0, 52, 104, 156, 167]
    assert all(c.offset % ratio == 0 and c.count == 5 and c.frames == 250 for c in plan)
    assert [c.valid for c in plan] == [chunk * ratio] * 4 + [chunk * ratio - 5]   # the last one ends in the padding
    assert sum(c.fresh for c in plan) == total
    # where each chunk's frames go: half the overlap (15) trimmed on inner edges; with an odd overlap the
    # later chunk has the frame both keep, and the anchored last chunk keeps everything after its left trim
    assert [(c.dst_start, c.src_start, c.length) for c in plan] == [
        (0, 0, 67), (67, 15, 52), (119, 15, 52), (171, 15, 11), (182, 15, 68)]
    assert sum(c.length for c in plan) == 250
    assert plan_windows(total, chunk * ratio, "full", length_multiple=ratio, overlap=overlap) == [
        (c.offset, c.valid, chunk * ratio) for c in plan]   # every chunk one length: one bucket


def test_chunks_that_end_exactly_at_the_end_need_no_anchored_extra():
    ratio = 4
    plan = plan_chunks(22 * ratio, 10 * ratio, 4, ratio)   # hop 6: 0, 6, 12 and 12 + 10 = 22
    assert [c.offset // ratio for c in plan] == [0, 6, 12]
    assert [(c.dst_start, c.length) for c in plan] == [(0, 8), (8, 6), (14, 8)]


@pytest.mark.parametrize("frames, chunks", [(9, 0), (10, 1), (11, 2)])
def test_a_file_shorter_than_one_chunk_is_not_chunked(frames, chunks):
    """SA3 encodes audio shorter than one chunk in one pass (no plan: a plain full window); a file of exactly
    one chunk is one chunk, which keeps all its frames."""
    ratio = 8
    plan = plan_chunks(frames * ratio - 3, 10 * ratio, 4, ratio)
    assert len(plan) == chunks
    if chunks == 1:
        assert (plan[0].dst_start, plan[0].src_start, plan[0].length) == (0, 0, 10)
    if chunks == 0:
        assert plan_windows(frames * ratio - 3, 10 * ratio, "full", length_multiple=ratio, overlap=4) == [
            (0, frames * ratio - 3, frames * ratio)]
    assert plan_chunks(frames * ratio * 5, 10 * ratio, 0, ratio) == []   # overlap 0: independent windows


def test_chunk_plan_refuses_what_sa3_cannot_do():
    with pytest.raises(ValueError, match="smaller than the chunk"):
        plan_chunks(1000, 80, 10, 8)
    with pytest.raises(ValueError, match="whole number of latent frames"):
        plan_chunks(1000, 81, 2, 8)
    data = encode_audio_bytes(np.zeros((4000, 1), dtype=np.float32), 16000, "wav")
    for kw, match in [({"chunking": "split"}, "chunking 'full' only"), ({"max_chunks": 2}, "exclude each other"),
                      ({"overlap": 100}, "must be in")]:
        options = {"chunking": "full", "overlap": 4, "length_multiple": 10, **kw}
        with pytest.raises(ValueError, match=match):
            iter_windows(data, ext="wav", sample_rate=16000, channels=1, sample_size=1000, **options)


def test_chunks_of_a_long_file_are_its_audio_and_describe_one_window_of_the_whole_file():
    _, data, _ = encoded("flac", seconds=1.5, rate=48000, channels=2)
    ref = reference(data, "flac", 44100, 2)
    total, ratio, size = ref.shape[1], 64, 64 * 100
    ws = windows(data, "flac", sample_rate=44100, channels=2, sample_size=size, chunking="full",
                 length_multiple=ratio, overlap=20)
    plan = plan_chunks(total, size, 20, ratio)
    assert len(ws) == len(plan) > 5 and [w.stitch for w in ws] == plan
    padded = torch.nn.functional.pad(ref, (0, -total % ratio))
    for w in ws:
        assert w.sample_size == size and w.offset == w.stitch.offset and w.valid_length == w.stitch.valid
        torch.testing.assert_close(w.audio, padded[:, w.offset:w.offset + size], atol=1e-5, rtol=0)
        md = w.metadata()
        assert json.loads(json.dumps(md)) == md
        assert (md["offset"], md["valid_length"], md["total_length"], md["chunk_index"], md["num_chunks"]) == (
            0, total, total, 0, 1)
        assert (md["chunk_frames"], md["overlap"], md["encoded_chunks"]) == (100, 20, len(plan))
        assert md["timestamps"] == [0.0, 1.0] and md["end_time"] == md["duration"] == total / 44100
    # a short file in the same run: a plain full window, as without --overlap
    [short] = windows(encoded("flac", seconds=0.1, rate=44100, channels=2)[1], "flac", sample_rate=44100,
                      channels=2, sample_size=size, chunking="full", length_multiple=ratio, overlap=20)
    assert short.stitch is None and "overlap" not in short.metadata() and short.sample_size < size


@pytest.mark.parametrize("chunking", ["crop", "random_crop", "split"])
def test_short_file_gives_one_padded_window(chunking):
    source, data, _ = encoded("flac", seconds=0.25, rate=22050, channels=1)
    ws = windows(data, "flac", sample_rate=44100, channels=2, sample_size=44100, chunking=chunking, key="k")
    assert len(ws) == 1
    [w] = ws
    assert w.offset == 0 and w.valid_length == w.total_length == 2 * source.shape[0]
    assert w.audio.shape == (2, 44100)
    assert torch.all(w.audio[:, w.valid_length:] == 0)
    assert torch.any(w.audio[:, :w.valid_length] != 0)
    assert torch.equal(w.audio[0], w.audio[1])  # mono source repeated to stereo
    assert w.padding_mask.sum() == w.valid_length


def test_metadata_keys_and_values():
    _, data, _ = encoded("wav", seconds=2.5, rate=16000, channels=1)  # 40000 frames
    ws = windows(data, "wav", sample_rate=16000, channels=2, sample_size=16000, chunking="split")
    assert len(ws) == 3
    expected_keys = {"audio_channels", "sample_rate", "source_sample_rate", "source_channels", "duration",
                     "start_time", "end_time", "seconds_start", "seconds_total", "timestamps", "chunk_index",
                     "num_chunks", "valid_length", "total_length", "offset"}
    for w in ws:
        meta = w.metadata()
        assert set(meta) == expected_keys
        # JSON-native only.
        assert json.loads(json.dumps(meta)) == meta
    m0, m1, m2 = (w.metadata() for w in ws)
    assert m0["audio_channels"] == 2 and m0["source_channels"] == 1
    assert m0["sample_rate"] == m0["source_sample_rate"] == 16000
    assert m0["duration"] == 2.5 and m0["total_length"] == 40000 and m0["num_chunks"] == 3
    assert (m1["offset"], m1["start_time"], m1["end_time"], m1["seconds_start"]) == (16000, 1.0, 2.0, 1)
    assert (m2["offset"], m2["valid_length"], m2["end_time"], m2["seconds_start"]) == (32000, 8000, 2.5, 2)
    assert all(m["seconds_total"] == 3 for m in (m0, m1, m2))  # ceil(2.5)
    # PadCrop_Normalized_T: upper_bound = 24000, denominator = upper_bound + sample_size = 40000.
    assert m0["timestamps"] == [0.0, 16000 / 40000]
    assert m1["timestamps"] == [16000 / 40000, 32000 / 40000]
    assert m2["timestamps"] == [32000 / 40000, 1.0]
    assert isinstance(m0["seconds_start"], int) and isinstance(m0["seconds_total"], int)


def test_metadata_short_file_timestamps():
    _, data, _ = encoded("wav", seconds=0.5, rate=16000, channels=1)
    [w] = windows(data, "wav", sample_rate=16000, channels=1, sample_size=16000)
    meta = w.metadata()
    assert meta["timestamps"] == [0.0, 1.0]  # denominator is sample_size when the file is shorter
    assert meta["seconds_total"] == 1 and meta["seconds_start"] == 0
    assert meta["valid_length"] == 8000 and meta["end_time"] == 0.5


# --------------------------------------------------------------------------- errors


def test_random_bytes_named_wav():
    junk = np.random.default_rng(0).bytes(4096)
    with pytest.raises(AudioDecodeError, match="wav"):
        windows(junk, "wav", sample_rate=16000, channels=1, sample_size=1000)
    with pytest.raises(AudioDecodeError):
        decode_audio(junk, "wav")


def test_a_broken_m4a_says_what_ffmpeg_said():
    junk = b"\x00\x00\x00\x20ftypM4A " + bytes(200)
    with pytest.raises(AudioDecodeError, match=r"cannot decode \.m4a audio: FFmpeg says"):
        decode_audio(junk, "m4a")


def test_a_wav_libsndfile_cannot_open_says_what_both_decoders_said():
    with pytest.raises(AudioDecodeError, match=r"libsndfile says .*FFmpeg says"):
        decode_audio(np.random.default_rng(0).bytes(4096), "wav")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.05])
@pytest.mark.parametrize("chunking", ["crop", "random_crop", "split"])
def test_truncated_flac_decodes_or_raises_audio_decode_error(fraction, chunking):
    _, data, _ = encoded("flac", seconds=2.0, rate=22050, channels=2, kind="noise")
    cut = data[:int(len(data) * fraction)]
    try:
        ws = windows(cut, "flac", sample_rate=22050, channels=2, sample_size=8000, chunking=chunking, key="k")
    except AudioDecodeError:
        return
    for w in ws:  # if it decodes, what it returns must be sane
        assert torch.isfinite(w.audio).all()
        assert 1 <= w.valid_length <= 8000


@pytest.mark.parametrize("chunking", ["random_crop", "split"])
def test_truncated_mp3_uses_the_frames_that_exist(chunking):
    # The LAME/Xing header still declares 2 s; libsndfile reports that length, so the
    # reader must notice the early end of stream and plan windows on what decodes.
    _, data, _ = encoded("mp3", seconds=2.0, rate=44100, channels=2, kind="noise")
    cut = data[:len(data) // 2]
    decodable = decode_audio(cut, "mp3")[0].shape[1]
    assert decodable < 88200 * 0.6
    ws = windows(cut, "mp3", sample_rate=44100, channels=2, sample_size=4096, chunking=chunking, key="k")
    assert all(w.total_length == decodable for w in ws)
    assert 0 <= ws[0].offset <= decodable - 4096
    if chunking == "split":
        assert sum(w.valid_length for w in ws) == decodable


def test_empty_data():
    for data in (b"", bytearray()):
        with pytest.raises(AudioDecodeError, match="no audio frames"):
            windows(data, "flac", sample_rate=16000, channels=1, sample_size=100)


def test_wav_with_zero_frames():
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0, 1), np.float32), 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioDecodeError, match="no audio frames"):
        windows(buf.getvalue(), "wav", sample_rate=16000, channels=1, sample_size=100)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_wav(bad):
    audio = np.full((4000, 1), 0.1, np.float32)
    audio[1000:1010] = bad
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="non-finite"):
        windows(buf.getvalue(), "wav", sample_rate=16000, channels=1, sample_size=2000)
    with pytest.raises(AudioDecodeError, match="non-finite"):
        decode_audio(buf.getvalue(), "wav")
    # A window that does not touch the bad samples is fine.
    ws = windows(buf.getvalue(), "wav", sample_rate=16000, channels=1, sample_size=500, chunking="split",
                 max_chunks=2)
    assert len(ws) == 2


def test_bad_arguments_are_plain_value_errors():
    _, data, _ = encoded("wav", seconds=0.5, rate=16000, channels=1)
    with pytest.raises(ValueError) as info:
        iter_windows(data, ext="wav", sample_rate=16000, channels=1, sample_size=100, chunking="middle")
    assert not isinstance(info.value, AudioDecodeError)
    with pytest.raises(ValueError):
        iter_windows(data, ext="wav", sample_rate=16000, channels=1, sample_size=0)


# --------------------------------------------------------------------------- bounded reading


@pytest.fixture(scope="module")
def ten_minute_flac():
    audio = synth_waveform("tone", 600.0, 16000, 1, np.random.default_rng(0))
    return encode_audio_bytes(audio, 16000, "flac")


def _peak_numpy_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("target_rate,chunking", [(16000, "crop"), (44100, "crop"), (44100, "random_crop")])
def test_long_file_crop_reads_only_needed_frames(ten_minute_flac, target_rate, chunking):
    whole_bytes = 600 * 16000 * 4  # float32 mono decode of the whole file: 38.4 MB
    ws, peak = _peak_numpy_bytes(lambda: windows(
        ten_minute_flac, "flac", sample_rate=target_rate, channels=1, sample_size=target_rate,
        chunking=chunking, key="long"))
    [w] = ws
    assert w.total_length == 600 * target_rate
    # numpy buffers from libsndfile are traced; one 1 s window needs ~64 kB of source.
    assert peak < 1_000_000, peak
    assert peak < whole_bytes / 30
    if chunking == "crop":
        _, full_peak = _peak_numpy_bytes(lambda: decode_audio(ten_minute_flac, "flac"))
        assert full_peak >= whole_bytes  # the comparison point really does hold the whole file


@pytest.mark.parametrize("ext", ["flac", "mp3"])
@pytest.mark.parametrize("chunking", ["random_crop", "split"])
def test_unseekable_stream_falls_back_to_sequential_reading(monkeypatch, ext, chunking):
    _, data, _ = encoded(ext, seconds=2.0, rate=22050, channels=2)
    kw = dict(sample_rate=16000, channels=1, sample_size=6000, chunking=chunking, key="seq")
    expected = windows(data, ext, **kw)
    # Pretend libsndfile cannot seek: lengths must be counted and ranges read in order.
    monkeypatch.setattr(sf.SoundFile, "seekable", lambda self: False)
    got = windows(data, ext, **kw)
    assert [(w.offset, w.valid_length, w.total_length) for w in got] == \
        [(w.offset, w.valid_length, w.total_length) for w in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.audio, b.audio, atol=1e-4, rtol=0)


def test_impossible_channel_count_is_a_decode_error():
    _, data, _ = encoded("wav", seconds=0.5, rate=16000, channels=2)
    with pytest.raises(AudioDecodeError, match="3 channels"):
        windows(data, "wav", sample_rate=16000, channels=3, sample_size=1000)
    [w] = windows(data, "wav", sample_rate=16000, channels=1, sample_size=1000)
    assert w.audio.shape == (1, 1000) and w.source_channels == 2


_SPLIT_MP3 = r"""
import sys
import wds_encode.pipeline.audio as audio
import wds_encode.pipeline.decoders.sndfile as sndfile
from wds_encode.synth import make_sample_set
if sys.argv[1] == "loud":
    sndfile._NOISY_SEEK_FORMATS = frozenset()
# the 11th sample of this set (22.05 kHz noise) makes libmpg123 complain after a mid-file seek
sample, data, _ = make_sample_set(11, seed=0, formats=("mp3",), min_seconds=2, max_seconds=3)[-1]
# --max-chunks: the file is read range by range (not decoded whole), after a seek to its end checks its length
windows = list(audio.iter_windows(data, ext="mp3", sample_rate=44100, channels=2, sample_size=16384,
                                  chunking="split", key=sample.key, max_chunks=8))
print(len(windows))
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_mp3_seeks_do_not_print_decoder_noise(mode):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", _SPLIT_MP3, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 5
    # libmpg123 complains after mid-file seeks; the reader silences it (and only it)
    assert ("mpg123" in result.stderr) == (mode == "loud"), result.stderr[-500:]
