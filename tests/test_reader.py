"""reader.py: tar members -> windows and error records; never raises on bad data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from wds_encode.pipeline.reader import Reader, ReaderOptions, ShardEnd, WindowItem, sanitize_key
from wds_encode.pipeline.sources import Shard
from wds_encode.synth import encode_audio_bytes

from conftest import write_tar

OPTS = ReaderOptions(sample_rate=16000, channels=2, sample_size=8000, chunking="crop")


def tone(seconds=0.4, sr=16000, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def float_wav(audio, sr=16000):
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def read_all(path, options=OPTS):
    shard = Shard(url=str(path), dataset_id="ds", name=path.stem)
    out = list(Reader([shard], options).read_shard(shard))
    assert isinstance(out[-1], ShardEnd) and all(isinstance(i, WindowItem) for i in out[:-1])
    return out[:-1], out[-1]


def test_good_samples_with_metadata(tmp_path):
    flac = encode_audio_bytes(tone(channels=1), 16000, "flac")
    path = write_tar(tmp_path / "s.tar", [("a.flac", flac), ("a.json", json.dumps({"text": "hi", "bpm": 90}).encode()),
                                          ("sub/b.audio.flac", flac)])
    items, end = read_all(path)
    assert [i.key for i in items] == ["a", "sub__b"]
    assert end.samples == 2 and end.windows == 2 and not end.errors and not end.failed
    a = items[0]
    assert a.audio.shape == (2, 8000) and a.padding_mask.sum() == 6400
    assert a.metadata["prompt"] == "hi" and a.metadata["bpm"] == 90
    assert a.metadata["__key__"] == "a" and a.metadata["source_shard"] == "ds/s"
    assert a.metadata["path"] == f"{path}#a.flac"
    assert items[1].metadata["__key__"] == "sub/b"


def test_corrupt_members_become_records(tmp_path):
    good = encode_audio_bytes(tone(), 16000, "flac")
    members = [
        ("good1.flac", good),
        ("trunc.flac", good[: len(good) // 3]),
        ("noise.wav", np.random.default_rng(0).bytes(3000)),
        ("empty.flac", b""),
        ("meta_only.json", b'{"text": "no audio"}'),
        ("../evil.flac", good),
        ("badjson.flac", good), ("badjson.json", b"{not json"),
        ("nan.wav", float_wav(np.full((800, 1), np.nan, np.float32))),
        ("good2.flac", good),
    ]
    items, end = read_all(write_tar(tmp_path / "bad.tar", members))
    keys = [i.key for i in items]
    assert "good1" in keys and "good2" in keys and "evil" in keys
    reasons = {r["key"]: r for r in end.errors}
    for bad in ("noise", "empty", "meta_only", "badjson", "nan"):
        assert reasons[bad]["level"] == "error", bad
        assert reasons[bad]["shard"] == "ds/bad"
    assert "no audio member" in reasons["meta_only"]["reason"]
    assert "invalid JSON" in reasons["badjson"]["reason"]
    assert reasons["../evil"]["level"] == "warning" and "unsafe key" in reasons["../evil"]["reason"]
    # a truncated FLAC either decodes what is there or is an error record: never both, never a crash
    assert ("trunc" in keys) != ("trunc" in reasons)
    assert not end.failed


def test_truncated_tar_keeps_what_was_read(tmp_path):
    good = encode_audio_bytes(tone(), 16000, "wav")
    path = write_tar(tmp_path / "cut.tar", [(f"k{i}.wav", good) for i in range(6)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    items, end = read_all(path)
    assert end.failed
    assert 1 <= len(items) < 6
    assert [i.key for i in items] == [f"k{i}" for i in range(len(items))]
    assert any("tar read failed" in r["reason"] for r in end.errors)


def test_missing_shard_is_a_record(tmp_path):
    items, end = read_all(tmp_path / "missing.tar")
    assert not items and end.failed and "cannot read" in end.errors[0]["reason"]


def test_split_and_custom_metadata(tmp_path):
    module = tmp_path / "md.py"
    module.write_text("def get_custom_metadata(info, audio):\n"
                      "    if info['chunk_index'] == 1:\n        return {'__reject__': True}\n"
                      "    return {'peak': float(audio.abs().max()), 'rel': info['__key__']}\n")
    path = write_tar(tmp_path / "s.tar", [("long.wav", encode_audio_bytes(tone(seconds=1.8), 16000, "wav"))])
    shard = Shard(url=str(path), dataset_id="ds", name="s", custom_metadata_module=str(module))
    opts = ReaderOptions(sample_rate=16000, channels=1, sample_size=8000, chunking="split")
    out = list(Reader([shard], opts).read_shard(shard))
    items, end = out[:-1], out[-1]
    assert [i.key for i in items] == ["long_0000", "long_0002", "long_0003"]
    assert end.rejected == 1 and end.windows == 3
    assert all(i.metadata["num_chunks"] == 4 and i.metadata["rel"] == "long" for i in items)
    assert items[0].metadata["peak"] == pytest.approx(0.5, abs=0.01)


def test_claimed_units_are_read_exactly_once_across_loaders_and_workers(tmp_path):
    """Two DataLoaders (two ranks) x 2 workers claim from one store: every unit once, bytes add up."""
    from torch.utils.data import DataLoader

    from wds_encode.job.distributed import Job, Launch, UnitClaims
    from wds_encode.synth import write_tar_shards

    paths, samples = [], []
    for i, n in enumerate([1, 4, 2, 3, 1]):
        p, s = write_tar_shards(tmp_path, 1, n, seed=i, name=f"u{i}", max_seconds=0.5)
        paths += p
        samples += s
    shards = [Shard(url=str(p), dataset_id="ds", name=p.stem, size=p.stat().st_size) for p in paths]
    job = Job(Launch(), torch.device("cpu"), peer_timeout=60)
    try:
        claims = UnitClaims(job.address, len(shards))
        ends, items = [], []
        for _rank in range(2):
            loader = DataLoader(Reader(shards, OPTS, claims), batch_size=None, num_workers=2)
            for item in loader:
                (ends if isinstance(item, ShardEnd) else items).append(item)
    finally:
        job.close()
    assert sorted(e.shard.name for e in ends) == sorted(p.stem for p in paths)  # each unit exactly once
    assert sorted(i.metadata["__key__"] for i in items) == sorted(s.key for s in samples)
    assert {e.worker for e in ends} <= {0, 1}
    # progress accounting: a unit's windows plus its end marker account for exactly its bytes
    assert sum(i.input_bytes for i in items) + sum(e.input_bytes for e in ends) == sum(s.size for s in shards)
    assert all(i.input_bytes > 0 for i in items)  # crop: one window per sample


@pytest.mark.parametrize("key, safe, warns", [
    ("plain-key_1", "plain-key_1", False),
    ("dir/sub/file", "dir__sub__file", False),
    ("../../etc/passwd", "etc__passwd", True),
    ("/abs/x", "abs__x", True),
    ("a\x00b\nc", "a_b_c", True),
    ("with.dots and space", "with_dots_and_space", False),
    ("..", "sample", True),
])
def test_sanitize_key(key, safe, warns):
    out, warning = sanitize_key(key)
    assert out == safe and (warning is not None) == warns


# ---------------------------------------------------------------------------------------- captions

def caption_tar(path):
    """Samples with every kind of caption: a KEY.txt beside KEY.json, alone, broken, empty, orphaned."""
    flac = encode_audio_bytes(tone(), 16000, "flac")
    return write_tar(path, [
        ("both.flac", flac), ("both.json", json.dumps({"text": "from json", "prompt": "json prompt"}).encode()),
        ("both.txt", "  a caption, in UTF-8: Été à Köln \n\n".encode()),
        ("txt.flac", flac), ("txt.txt", "\ufeffjust the file\r\n".encode()),  # a BOM and CRLF, as editors write
        ("json.flac", flac), ("json.json", b'{"text": "only json"}'),
        ("latin1.flac", flac), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("empty.flac", flac), ("empty.txt", b" \n"),
        ("orphan.txt", b"a caption whose audio is missing"),
        ("after.flac", flac),
    ])


def test_txt_members_become_the_prompt_and_win_over_json(tmp_path):
    items, end = read_all(caption_tar(tmp_path / "caps.tar"))
    by_key = {i.key: i.metadata for i in items}
    assert sorted(by_key) == ["after", "both", "empty", "json", "txt"]
    assert by_key["both"]["prompt"] == "a caption, in UTF-8: Été à Köln"  # stripped, the .txt wins
    assert by_key["both"]["text"] == "from json"                        # KEY.json's fields stay as they are
    assert by_key["txt"]["prompt"] == "just the file"
    assert by_key["json"]["prompt"] == "only json"                      # as before: text -> prompt
    assert by_key["empty"]["prompt"] == ""
    assert "prompt" not in by_key["after"]
    json.dumps(by_key["both"], ensure_ascii=False)  # JSON-native
    problems = {(r["key"], r["level"]): r for r in end.errors}
    assert set(problems) == {("latin1", "error"), ("empty", "warning"), ("orphan", "error")}
    bad = problems[("latin1", "error")]
    assert bad["shard"] == "ds/caps" and "caption latin1.txt is not valid UTF-8" in bad["reason"]
    assert "empty.txt is empty" in problems[("empty", "warning")]["reason"]
    assert "no audio member" in problems[("orphan", "error")]["reason"]  # only where there is no audio
    assert end.samples == 6 and end.windows == 5 and not end.failed


def test_txt_members_of_a_tar_on_s3(tmp_path, s3_in_process):
    s3_in_process.make_bucket("caps")
    s3_in_process.put("caps", "in/caps.tar", caption_tar(tmp_path / "caps.tar").read_bytes())
    shard = Shard(url="s3://caps/in/caps.tar", dataset_id="ds", name="caps")
    out = list(Reader([shard], OPTS).read_shard(shard))
    items, end = out[:-1], out[-1]
    assert {i.key: i.metadata.get("prompt") for i in items} == {
        "both": "a caption, in UTF-8: Été à Köln", "txt": "just the file", "json": "only json", "empty": "",
        "after": None}
    assert any(r["key"] == "latin1" and "not valid UTF-8" in r["reason"] for r in end.errors)


def test_sidecar_captions_of_an_audio_folder(tmp_path):
    from wds_encode.config import DatasetConfig
    from wds_encode.pipeline.sources import list_shards
    flac = encode_audio_bytes(tone(), 16000, "flac")
    root = tmp_path / "audio"
    for rel in ("a/song.flac", "a/other.flac", "b/song.wav", "b/song.v2.flac", "c/broken.flac", "d/gone.flac"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(flac)
    (root / "a/song.txt").write_text("  song in a \n")
    (root / "b/song.txt").write_text("song in b")       # beside song.wav; song.v2.flac's would be song.v2.txt
    (root / "c/broken.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "d/gone.txt").write_text("listed, then deleted before the read")
    config = DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "dir", "path": str(root)}])
    [unit] = list_shards(config, files_per_unit=10)
    (root / "d/gone.txt").unlink()
    out = list(Reader([unit], OPTS).read_shard(unit))
    items, end = out[:-1], out[-1]
    prompts = {i.metadata["relpath"]: i.metadata.get("prompt") for i in items}
    assert prompts == {"a/song.flac": "song in a", "a/other.flac": None, "b/song.wav": "song in b",
                       "b/song.v2.flac": None}
    reasons = {r["key"]: r["reason"] for r in end.errors}
    assert set(reasons) == {"c/broken", "d/gone"} and all(r["level"] == "error" for r in end.errors)
    assert f"caption {root / 'c/broken.txt'} is not valid UTF-8" in reasons["c/broken"]
    assert "cannot read caption" in reasons["d/gone"] and end.samples == 6


def test_skip_silent_judges_a_long_file_by_all_its_windows_even_past_the_hold_limit(tmp_path, monkeypatch):
    """A file whose windows outgrow HOLD_BYTES while still silent is measured to its end: silent, it is
    filtered with nothing yielded; loud at the end, every window comes out once, in order."""
    import wds_encode.pipeline.reader as reader_module
    from wds_encode.pipeline.filters import FileFilters

    monkeypatch.setattr(reader_module, "HOLD_BYTES", 3 * 8000 * 4)   # three mono windows
    silent = np.zeros((16000 * 2, 1), np.float32)
    late = silent.copy()
    late[-4000:] = tone(0.25)
    path = write_tar(tmp_path / "s.tar", [("silent.wav", float_wav(silent)), ("late.wav", float_wav(late))])
    options = ReaderOptions(sample_rate=16000, channels=1, sample_size=8000, chunking="split",
                            filters=FileFilters(skip_silent=-60))
    items, end = read_all(path, options)
    assert [i.key for i in items] == [f"late_{n:04d}" for n in range(4)]
    assert end.filtered == 1 and end.windows == 4
    [problem] = end.errors
    assert problem["level"] == "rejected" and problem["key"] == "silent" and "-inf dBFS" in problem["reason"]
    assert float(items[-1].audio.abs().max()) > 0.4 and all(float(i.audio.abs().max()) == 0 for i in items[:-1])
