"""wds_encode.synth: deterministic synthetic datasets that decode to what they declare."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from wds_encode.synth import (
    KINDS,
    SynthSample,
    encode_audio_bytes,
    make_sample_set,
    synth_waveform,
    write_audio_folder,
    write_tar_shards,
)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(data), dtype="float32", always_2d=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 2])
def test_synth_waveform_shape_peak_and_channels(kind, channels):
    audio = synth_waveform(kind, 0.5, 22050, channels, np.random.default_rng(1))
    assert audio.dtype == np.float32
    assert audio.shape == (round(0.5 * 22050), channels)
    assert np.isfinite(audio).all()
    peak = np.abs(audio).max()
    assert 0.1 < peak <= 0.9
    if channels == 2:
        assert not np.allclose(audio[:, 0], audio[:, 1])  # stereo is really stereo
    again = synth_waveform(kind, 0.5, 22050, channels, np.random.default_rng(1))
    assert np.array_equal(audio, again)


def test_synth_waveform_tiny_and_silence_padding():
    assert synth_waveform("tone", 0.0, 16000, 1, np.random.default_rng(0)).shape == (1, 1)
    padded = synth_waveform("silence-padded", 1.0, 16000, 1, np.random.default_rng(0))
    assert np.all(padded[:1000] == 0) and np.all(padded[-1000:] == 0)  # >= 10 % silence each side
    assert np.abs(padded).max() > 0.4
    with pytest.raises(ValueError):
        synth_waveform("whistle", 1.0, 16000, 1, np.random.default_rng(0))


@pytest.mark.parametrize("ext,rate", [("flac", 44100), ("wav", 16000), ("ogg", 22050), ("mp3", 32000),
                                      ("opus", 48000)])
def test_encode_audio_bytes_round_trip(ext, rate):
    audio = synth_waveform("chord", 0.7, rate, 2, np.random.default_rng(0))
    data = encode_audio_bytes(audio, rate, ext)
    decoded, got_rate = decode(data)
    assert got_rate == rate
    assert decoded.shape == audio.shape  # libsndfile 1.2.2 trims codec delay/padding exactly
    if ext in ("flac", "wav"):
        assert np.abs(decoded - audio).max() <= 1 / 32768 + 1e-7
    else:
        assert np.corrcoef(decoded.ravel(), audio.ravel())[0, 1] > 0.9
    # Same input, same bytes -- also for Ogg, whose random stream serial number is pinned.
    assert encode_audio_bytes(audio, rate, ext) == data


def test_encode_audio_bytes_rejects_unsupported():
    audio = np.zeros((100, 1), np.float32)
    with pytest.raises(ValueError, match="Opus"):
        encode_audio_bytes(audio, 44100, "opus")
    with pytest.raises(ValueError, match="MP3"):
        encode_audio_bytes(audio, 96000, "mp3")
    with pytest.raises(ValueError, match="Opus"):
        encode_audio_bytes(audio, 44100, "webm")
    with pytest.raises(ValueError, match="supported"):
        encode_audio_bytes(audio, 44100, "xyz")


def test_sample_set_decodes_to_declared_properties():
    samples = make_sample_set(16, seed=5, formats=("flac", "wav", "mp3", "ogg", "opus"))
    assert [s.key for s, _, _ in samples] == [f"sample-{i:06d}" for i in range(16)]
    assert {s.ext for s, _, _ in samples} == {"flac", "wav", "mp3", "ogg", "opus"}
    assert {s.channels for s, _, _ in samples} == {1, 2}
    assert len({s.sample_rate for s, _, _ in samples}) >= 3
    for sample, data, meta in samples:
        assert isinstance(sample, SynthSample)
        audio, rate = decode(data)
        assert rate == sample.sample_rate and audio.shape == (sample.frames, sample.channels)
        assert 0.3 <= sample.frames / rate <= 3.0
        assert sample.kind in KINDS and meta["kind"] == sample.kind
        assert isinstance(meta["text"], str) and meta["text"]
        assert meta["sample_rate"] == rate and meta["channels"] == sample.channels
        assert meta["frames"] == sample.frames and meta["format"] == sample.ext
        assert isinstance(meta["frequency"], float)
        assert json.loads(json.dumps(meta)) == meta
        if sample.ext == "opus":
            assert rate == 48000


def test_sample_set_is_deterministic_and_seed_dependent():
    a = make_sample_set(8, seed=3)
    b = make_sample_set(8, seed=3)
    c = make_sample_set(8, seed=4)
    assert [(s, d, m) for s, d, m in a] == [(s, d, m) for s, d, m in b]
    assert [d for _, d, _ in a] != [d for _, d, _ in c]
    # Sample i does not depend on how many samples were asked for.
    assert make_sample_set(3, seed=3) == a[:3]


def test_write_tar_shards(tmp_path):
    paths, samples = write_tar_shards(tmp_path / "shards", 3, 4, seed=2, name="demo")
    assert [p.name for p in paths] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert all(p.exists() for p in paths)
    keys = [s.key for s in samples]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert all("." not in k for k in keys)
    by_key = {s.key: s for s in samples}
    for shard, path in enumerate(paths):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            shard_samples = samples[shard * 4:(shard + 1) * 4]
            assert names == [n for s in shard_samples for n in (f"{s.key}.{s.ext}", f"{s.key}.json")]
            for s in shard_samples:
                audio, rate = decode(tar.extractfile(f"{s.key}.{s.ext}").read())
                assert rate == s.sample_rate and audio.shape == (s.frames, s.channels)
                meta = json.loads(tar.extractfile(f"{s.key}.json").read())
                assert meta["frames"] == s.frames and meta["text"]
    # webdataset groups the members back into samples by key.
    seen = []
    for item in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        s = by_key[item["__key__"]]
        assert set(item) >= {"__key__", s.ext, "json"}
        seen.append(item["__key__"])
    assert seen == keys
    # Same seed -> byte-identical shards.
    again, _ = write_tar_shards(tmp_path / "again", 3, 4, seed=2, name="demo")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_write_audio_folder(tmp_path):
    samples = write_audio_folder(tmp_path / "audio", 7, seed=1, formats=("wav", "flac", "mp3"))
    files = sorted(p for p in (tmp_path / "audio").rglob("*") if p.is_file())
    assert len(files) == 7
    assert all(len(p.relative_to(tmp_path / "audio").parts) == 3 for p in files)  # two folder levels
    assert len({p.parent for p in files}) > 1
    by_name = {p.name: p for p in files}
    for s in samples:
        audio, rate = decode(by_name[f"{s.key}.{s.ext}"].read_bytes())
        assert rate == s.sample_rate and audio.shape == (s.frames, s.channels)
    flat = write_audio_folder(tmp_path / "flat", 3, seed=1, nested=False)
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == sorted(f"{s.key}.{s.ext}" for s in flat)
