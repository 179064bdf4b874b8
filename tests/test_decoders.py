"""wds_encode.pipeline.decoders: each backend reads any range of a file as a slice of its whole decode."""

from __future__ import annotations

import numpy as np
import pytest

from wds_encode.pipeline.audio import decode_audio
from wds_encode.pipeline.decoders import AUDIO_EXTENSIONS, AudioDecodeError, open_reader, pyav, sndfile
from wds_encode.synth import encode_audio_bytes, synth_waveform

RANGES = [(0, 1000), (500, 3000), (2999, 50_000), (49_000, 60_000), (100, 200), (80_000, 10**9), (5, 6)]


@pytest.mark.parametrize("ext", ["m4a", "mp4", "webm", "aac", "flac", "mp3"])
@pytest.mark.parametrize("whole", [False, True])
def test_any_range_is_the_same_slice_of_the_whole_decode(ext, whole):
    """Forward reads overlapping the last (a resampler's lead), a jump ahead, one back to the start
    (decoded again), one past the end (cut at it): each equals the whole file's decode there."""
    rate = 48000 if ext == "webm" else 44100
    data = encode_audio_bytes(synth_waveform("pluck", 2.0, rate, 2, np.random.default_rng(1)), rate, ext)
    full = decode_audio(data, ext)[0].numpy()
    with open_reader(data, ext, whole=whole) as reader:
        assert reader.frames == full.shape[1] and reader.channels == 2 and reader.sample_rate == rate
        for start, stop in RANGES:
            got = reader.read(start, stop)
            assert got.shape == (2, max(0, min(stop, full.shape[1]) - start)), (start, stop)
            assert np.array_equal(got, full[:, start:stop]), (start, stop)


def test_a_container_with_no_audio_stream_says_what_it_holds():
    import io

    import av
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        for index in range(5):
            picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            picture.pts = index
            for packet in video.encode(picture):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
    with pytest.raises(AudioDecodeError, match=r"no audio stream in \.mp4 data \(it holds video\)"):
        open_reader(buffer.getvalue(), "mp4")


def test_an_mp4_stops_where_its_duration_says_not_at_the_end_of_its_last_aac_frame():
    """AAC codes 1024-sample frames: the last one is padded past the audio. The MP4's duration says where
    the audio ends, and the reader stops there; the decoder alone gives the padding too."""
    import io

    import av
    data = encode_audio_bytes(synth_waveform("chord", 2.0, 44100, 2, np.random.default_rng(2)), 44100, "m4a")
    with av.open(io.BytesIO(data)) as container:
        decoded = sum(frame.samples for frame in container.decode(container.streams.audio[0]))
    assert decoded % 1024 == 0 and decoded > 88200
    with pyav.PyAVReader(data, "m4a") as reader:
        assert reader.frames == 88200
        assert reader.read(0, 10**9).shape == (2, 88200)


def test_every_suffix_has_one_decoder_and_one_place_in_the_order():
    assert sorted(AUDIO_EXTENSIONS) == sorted(sndfile.EXTENSIONS + pyav.EXTENSIONS)
    assert len(set(AUDIO_EXTENSIONS)) == len(AUDIO_EXTENSIONS)


def _ffmpeg_file(muxer: str, codec: str, audio: np.ndarray) -> bytes:
    """`audio` [2, n] at 44.1 kHz through one of FFmpeg's encoders and muxers (the less common formats)."""
    import io
    from fractions import Fraction

    import av
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=44100, layout="stereo")
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="stereo",
                                      rate=44100)
        frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 44100, 0, Fraction(1, 44100)
        packets = []
        for converted in resampler.resample(frame) + resampler.resample(None):
            packets += stream.encode(converted)
        for packet in packets + stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# (suffix, muxer, codec, frames more than the source at most, priming recorded)
LESS_COMMON = [("wv", "wv", "wavpack", 0, True), ("tta", "tta", "tta", 0, True), ("caf", "caf", "pcm_s16le", 0, True),
               ("m4v", "mp4", "aac", 0, True), ("3gp", "3gp", "aac", 0, True), ("avi", "avi", "pcm_s16le", 0, True),
               ("mp2", "mp2", "mp2", 2 * 1152, False), ("flv", "flv", "aac", 2 * 1024, False)]


@pytest.mark.parametrize("ext,muxer,codec,extra,recorded", LESS_COMMON, ids=[row[0] for row in LESS_COMMON])
def test_less_common_formats_decode_at_their_length_or_say_their_delay_is_unknown(ext, muxer, codec, extra,
                                                                                 recorded):
    audio = (np.random.default_rng(0).standard_normal((2, 22050)) * 0.1).astype(np.float32)
    with open_reader(_ffmpeg_file(muxer, codec, audio), ext) as reader:
        assert reader.sample_rate == 44100 and reader.channels == 2
        assert 22050 <= reader.frames <= 22050 + extra
        assert reader.delay_unknown is (not recorded)


def test_a_read_far_into_an_m4a_seeks_and_gives_the_same_samples(monkeypatch):
    """A random crop 40 s into a long M4A: the reader seeks (its timestamps are sample numbers) to a
    second before the crop instead of decoding the 40 s before it, and gives what decoding on gives: the
    AAC decoder's state is whole again after that second (noise-filled bands aside, which a seek draws
    afresh: the bound is the codec's own error on this music, not float rounding)."""
    rate = 44100
    audio = synth_waveform("chord", 45.0, rate, 2, np.random.default_rng(5))
    data = encode_audio_bytes(audio, rate, "m4a")
    full = decode_audio(data, "m4a")[0].numpy()
    decoded = []
    real_next = pyav.PyAVReader._next_frame

    def counting(self):
        frame = real_next(self)
        decoded.append(0 if frame is None else frame.samples)
        return frame

    monkeypatch.setattr(pyav.PyAVReader, "_next_frame", counting)
    with pyav.PyAVReader(data, "m4a") as reader:
        start, stop = 40 * rate + 123, 42 * rate
        got = reader.read(start, stop)
        assert sum(decoded) < 5 * rate            # about the 2 s read and the second before it, not 42 s
        expected = full[:, start:stop]
        assert got.shape == expected.shape
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        source_error = np.linalg.norm(full[:, :stop] - audio[:stop].T) / np.linalg.norm(audio[:stop].T)
        assert error < source_error / 4, (error, source_error)
        again = reader.read(start - 2 * rate, start)   # back, but past 10 s: seeks again
        assert np.linalg.norm(again - full[:, start - 2 * rate:start]) < 0.25 * source_error * np.linalg.norm(again)


@pytest.mark.parametrize("ext", ["webm", "m4a", "aac", "wma"])
def test_a_truncated_file_is_read_to_where_it_ends_or_is_one_decode_error(ext):
    """WebM and WMA (no index to contradict) end where their data does; an M4A whose index outlives its
    data, or an ADTS stream cut inside a frame, is an AudioDecodeError naming the format, not a crash."""
    rate = 48000 if ext == "webm" else 44100
    data = encode_audio_bytes(synth_waveform("chord", 2.0, rate, 2, np.random.default_rng(0)), rate, ext)
    cut = data[:len(data) // 2]
    try:
        with open_reader(cut, ext, whole=True) as reader:
            assert 0 < reader.frames < 2 * rate and reader.read(0, 10**9).shape == (2, reader.frames)
            assert ext in ("webm", "wma")
    except AudioDecodeError as exc:
        assert ext in ("m4a", "aac") and f".{ext} audio" in str(exc)
