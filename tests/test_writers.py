"""writers.py: the folder layout and latent tars, written through a local or S3 Place, visible on commit."""

import io
import json
import tarfile

import numpy as np
import webdataset as wds

from wds_encode.storage import LocalPlace, S3Place
from wds_encode.pipeline.writers import FolderWriter, LatentShardWriter, folder_file_id, parse_latent_id


def test_folder_layout_round_trip(place):
    writer = FolderWriter(place, rank=0)
    latent = np.arange(12, dtype=np.float32).reshape(3, 4)
    files = writer.stage(writer.latent_id(0, 0), latent, {"a": 1})
    assert files == ["0/0000000000000.json", "0/0000000000000.npy"]
    writer.commit(files)
    assert np.array_equal(np.load(io.BytesIO(place.read(files[1]))), latent)
    assert json.loads(place.read(files[0])) == {"a": 1}
    assert sorted(place.list()) == files  # nothing else: no partial file, no probe
    place.close()


def test_local_folder_files_are_invisible_until_commit(tmp_path):
    place = LocalPlace(str(tmp_path))
    writer = FolderWriter(place, rank=2, first_batch_index=42)
    files = writer.stage(writer.latent_id(42, 7), np.zeros((1, 1), np.float32), {})
    assert files[1] == "2/0020000420007.npy"
    assert not any((tmp_path / f).exists() for f in files)
    writer.discard(files)
    assert place.list() == {}


def test_s3_folder_files_are_uploaded_off_the_callers_thread_and_discard_deletes_them(place):
    if not isinstance(place, S3Place):
        return
    writer = FolderWriter(place, rank=1)
    staged = [writer.stage(writer.latent_id(0, i), np.full((2, 3), i, np.float32), {"i": i}) for i in range(20)]
    writer.commit([f for pair in staged[:10] for f in pair])  # waits for these uploads only
    writer.discard([f for pair in staged[10:] for f in pair])
    place.close()
    assert sorted(place.list()) == sorted(f for pair in staged[:10] for f in pair)


def test_a_disabled_folder_writer_writes_nothing_but_still_names_windows(place):
    """--no-folder: ids go on (into each window's metadata), and no object is staged, published or deleted."""
    writer = FolderWriter(place, rank=3, first_batch_index=5, enabled=False)
    assert writer.latent_id(5, 2) == FolderWriter(place, rank=3).latent_id(5, 2) == "0030000050002"
    files = writer.stage(writer.latent_id(5, 2), np.zeros((2, 3), np.float32), {"a": 1})
    assert files == []
    writer.commit(files)
    writer.discard(files)
    writer.commit(["3/0030000050002.json", "3/0030000050002.npy"])  # whatever it is given: nothing to publish
    writer.discard(["3/0030000050002.json", "3/0030000050002.npy"])
    place.close()
    assert place.list() == {}


def test_a_disabled_folder_writer_leaves_other_files_alone(tmp_path):
    place = LocalPlace(str(tmp_path))
    FolderWriter(place, rank=0).commit(FolderWriter(place, rank=0).stage("0000000000000", np.ones((1, 1)), {}))
    before = sorted(place.list())
    FolderWriter(place, rank=0, enabled=False).discard(before)
    assert sorted(place.list()) == before == ["0/0000000000000.json", "0/0000000000000.npy"]


def test_latent_shards_split_and_read_back_with_webdataset(place, tmp_path):
    writer = LatentShardWriter(place, "ds", "part-a", maxcount=3, maxsize=10**9)
    keys = [writer.write(f"k{i}", np.full((2, 5), i, np.float32), {"i": i}) for i in range(7)]
    assert keys == [f"k{i}" for i in range(7)]
    assert not [rel for rel in place.list() if rel.endswith(".tar")]  # nothing visible before the commit
    parts = writer.commit()
    assert parts == ["shards/ds/part-a-000.tar", "shards/ds/part-a-001.tar", "shards/ds/part-a-002.tar"]
    copies = []
    for i, rel in enumerate(parts):
        copies.append(tmp_path / f"copy-{i}.tar")
        copies[-1].write_bytes(place.read(rel))
    samples = list(wds.WebDataset([str(p) for p in copies], shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == keys
    for s in samples:
        assert s["npy"].shape == (2, 5) and float(s["npy"][0, 0]) == s["json"]["i"]


def test_latent_shards_maxsize_and_duplicate_keys(place):
    writer = LatentShardWriter(place, "ds", "x", maxcount=100, maxsize=4096)
    for _ in range(4):
        writer.write("same", np.zeros((4, 100), np.float32), {})
    parts = writer.commit()
    assert len(parts) >= 2
    names = []
    for rel in parts:
        data = place.read(rel)
        assert len(data) <= 4096 + 2 * 1024 + 10240  # one sample may overflow a fresh part
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names += tar.getnames()
    assert names == ["same.json", "same.npy", "same_dup1.json", "same_dup1.npy", "same_dup2.json",
                     "same_dup2.npy", "same_dup3.json", "same_dup3.npy"]


def test_discard_leaves_nothing_not_even_an_open_upload(place, s3):
    writer = LatentShardWriter(place, "ds", "x", maxcount=1, maxsize=10**9)
    writer.write("a", np.zeros(1, np.float32), {})
    writer.write("b", np.zeros(1, np.float32), {})  # the first part is finished (uploaded, not completed)
    writer.discard()
    assert place.list() == {}
    if isinstance(place, S3Place):
        assert s3.multipart_uploads("out") == []


def test_identical_inputs_give_identical_tars(place):
    blobs = []
    for run in range(2):
        writer = LatentShardWriter(place, f"ds{run}", "x", maxcount=10, maxsize=10**9)
        writer.write("a", np.ones((2, 2), np.float32), {"z": 1})
        blobs.append(place.read(writer.commit()[0]))
    assert blobs[0] == blobs[1]
    tar = tarfile.open(fileobj=io.BytesIO(blobs[0]))
    assert {m.name: (m.mtime, m.uname, m.mode) for m in tar.getmembers()} == {
        "a.json": (0, "wds-encode", 0o644), "a.npy": (0, "wds-encode", 0o644)}
    assert np.load(io.BytesIO(tar.extractfile("a.npy").read())).sum() == 4


def test_latent_ids_and_folder_file_names_parse_back():
    assert parse_latent_id("0030000420007") == (3, 42, 7)
    assert parse_latent_id("12340000010002") == (1234, 1, 2)
    assert parse_latent_id("abc") is None
    assert folder_file_id("3/0030000420007.npy") == (3, "0030000420007")
    assert folder_file_id("3/0030000420007.json.partial") == (3, "0030000420007")
    assert folder_file_id("3/notes.txt") is None and folder_file_id("shards/a.tar") is None
