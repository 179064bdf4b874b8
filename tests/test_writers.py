"""writers.py: the folder layout, latent tars, atomic visibility and ids never reused."""

import io
import json
import tarfile

import numpy as np
import webdataset as wds

from wds_encode.writers import FolderWriter, LatentShardWriter


def test_folder_layout_is_invisible_until_commit(tmp_path):
    writer = FolderWriter(tmp_path, rank=0)
    latent = np.arange(12, dtype=np.float32).reshape(3, 4)
    finals = writer.stage(writer.latent_id(0, 0), latent, {"a": 1})
    assert [p.name for p in finals] == ["0000000000000.npy", "0000000000000.json"]
    assert not any(p.exists() for p in finals)
    writer.commit(finals)
    assert np.array_equal(np.load(finals[0]), latent)
    assert json.loads(finals[1].read_text()) == {"a": 1}
    assert not list(tmp_path.rglob("*.partial"))


def test_ids_continue_after_existing_batches_and_partials_are_removed(tmp_path):
    first = FolderWriter(tmp_path, rank=3)
    first.commit(first.stage(first.latent_id(41, 2), np.zeros((1, 1), np.float32), {}))
    left = first.stage(first.latent_id(42, 0), np.zeros((1, 1), np.float32), {})  # never committed
    second = FolderWriter(tmp_path, rank=3)
    assert second.first_batch_index == 42
    assert second.latent_id(42, 7) == "0030000420007"
    assert not left[0].with_name(left[0].name + ".partial").exists()


def test_latent_shards_split_and_read_back_with_webdataset(tmp_path):
    writer = LatentShardWriter(tmp_path, "ds", "part-a", maxcount=3, maxsize=10**9)
    keys = [writer.write(f"k{i}", np.full((2, 5), i, np.float32), {"i": i}) for i in range(7)]
    assert keys == [f"k{i}" for i in range(7)]
    assert not list((tmp_path / "ds").glob("*.tar"))
    parts = writer.commit()
    assert [p.name for p in parts] == ["part-a-000.tar", "part-a-001.tar", "part-a-002.tar"]
    samples = list(wds.WebDataset([str(p) for p in parts], shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == keys
    for s in samples:
        assert s["npy"].shape == (2, 5) and float(s["npy"][0, 0]) == s["json"]["i"]


def test_latent_shards_maxsize_and_duplicate_keys(tmp_path):
    writer = LatentShardWriter(tmp_path, "ds", "x", maxcount=100, maxsize=4096)
    for _ in range(4):
        writer.write("same", np.zeros((4, 100), np.float32), {})
    parts = writer.commit()
    assert len(parts) >= 2
    names = []
    for p in parts:
        assert p.stat().st_size <= 4096 + 2 * 1024 + 10240  # one sample may overflow a fresh part
        with tarfile.open(p) as tar:
            names += tar.getnames()
    assert names == ["same.npy", "same.json", "same_dup1.npy", "same_dup1.json", "same_dup2.npy",
                     "same_dup2.json", "same_dup3.npy", "same_dup3.json"]


def test_discard_leaves_nothing(tmp_path):
    writer = LatentShardWriter(tmp_path, "ds", "x", maxcount=1, maxsize=10**9)
    writer.write("a", np.zeros(1, np.float32), {})
    writer.write("b", np.zeros(1, np.float32), {})
    writer.discard()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_identical_inputs_give_identical_tars(tmp_path):
    blobs = []
    for run in range(2):
        writer = LatentShardWriter(tmp_path / str(run), "ds", "x", maxcount=10, maxsize=10**9)
        writer.write("a", np.ones((2, 2), np.float32), {"z": 1})
        blobs.append(writer.commit()[0].read_bytes())
    assert blobs[0] == blobs[1]
    assert np.load(io.BytesIO(tarfile.open(fileobj=io.BytesIO(blobs[0])).extractfile("a.npy").read())).sum() == 4
