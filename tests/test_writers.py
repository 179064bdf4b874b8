"""writers.py: the folder layout and latent tars, written through a local or S3 Place, visible on commit."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
import webdataset as wds

from wds_encode.storage import LocalPlace, S3Place
from wds_encode.pipeline.writers import (FolderWriter, LatentShardWriter, folder_file_id, folder_files,
                                         latent_shard_unit, new_writer_id, parse_latent_id, writer_of)

W = "r0-g1-a1b2c3"   # a writer id as new_writer_id makes them, fixed so that names can be spelled out


def test_writer_ids_name_the_rank_and_generation_and_differ_per_attempt():
    ids = [new_writer_id(3, 7) for _ in range(20)]
    assert all(re.fullmatch(r"r3-g7-[0-9a-f]{6}", wid) for wid in ids)
    assert len(set(ids)) == len(ids)
    assert new_writer_id(12, 0).startswith("r12-g0-")


def test_folder_layout_round_trip(place):
    writer = FolderWriter(place, rank=0, writer=W)
    latent = np.arange(12, dtype=np.float32).reshape(3, 4)
    files = writer.stage(writer.latent_id(0, 0), latent, {"a": 1})
    assert files == [f"0/{W}-000000-0000.json", f"0/{W}-000000-0000.npy"]
    writer.commit(files)
    assert np.array_equal(np.load(io.BytesIO(place.read(files[1]))), latent)
    assert json.loads(place.read(files[0])) == {"a": 1}
    assert sorted(place.list()) == files  # nothing else: no partial file, no probe
    place.close()


def test_local_folder_files_are_invisible_until_commit(tmp_path):
    place = LocalPlace(str(tmp_path))
    writer = FolderWriter(place, rank=2, writer="r2-g3-00ff00")
    files = writer.stage(writer.latent_id(42, 7), np.zeros((1, 1), np.float32), {})
    assert files == ["2/r2-g3-00ff00-000042-0007.json", "2/r2-g3-00ff00-000042-0007.npy"]
    assert not any((tmp_path / f).exists() for f in files)
    writer.discard(files)
    assert place.list() == {}


def test_s3_folder_files_are_uploaded_off_the_callers_thread_and_discard_deletes_them(place):
    if not isinstance(place, S3Place):
        return
    writer = FolderWriter(place, rank=1, writer=new_writer_id(1, 1))
    staged = [writer.stage(writer.latent_id(0, i), np.full((2, 3), i, np.float32), {"i": i}) for i in range(20)]
    writer.commit([f for pair in staged[:10] for f in pair])  # waits for these uploads only
    writer.discard([f for pair in staged[10:] for f in pair])
    place.close()
    assert sorted(place.list()) == sorted(f for pair in staged[:10] for f in pair)


def test_a_disabled_folder_writer_writes_nothing_but_still_names_windows(place):
    """--no-folder: ids go on (into each window's metadata), and no object is staged, published or deleted."""
    wid = "r3-g2-0a0b0c"
    writer = FolderWriter(place, rank=3, writer=wid, enabled=False)
    assert writer.latent_id(5, 2) == f"{wid}-000005-0002"
    assert FolderWriter(place, rank=3, writer=wid).latent_id(5, 2) == writer.latent_id(5, 2)
    files = writer.stage(writer.latent_id(5, 2), np.zeros((2, 3), np.float32), {"a": 1})
    assert files == []
    writer.commit(files)
    writer.discard(files)
    named = [f"3/{wid}-000005-0002.json", f"3/{wid}-000005-0002.npy"]
    writer.commit(named)  # whatever it is given: nothing to publish
    writer.discard(named)
    place.close()
    assert place.list() == {}


def test_a_disabled_folder_writer_leaves_other_files_alone(tmp_path):
    place = LocalPlace(str(tmp_path))
    enabled = FolderWriter(place, rank=0, writer=W)
    enabled.commit(enabled.stage(enabled.latent_id(0, 0), np.ones((1, 1)), {}))
    before = sorted(place.list())
    FolderWriter(place, rank=0, writer=W, enabled=False).discard(before)
    assert sorted(place.list()) == before == [f"0/{W}-000000-0000.json", f"0/{W}-000000-0000.npy"]


def test_two_writers_of_one_rank_never_make_the_same_file_name(place):
    """A retry racing its original, or a resumed run, writes the same rank and batch numbers: the writer
    id keeps their files apart, so neither overwrites (nor, cleaning up, removes) the other's."""
    # an original and a retry of one generation (same rank, same batch numbers), and a later generation
    writers = [FolderWriter(place, rank=4, writer=new_writer_id(4, generation)) for generation in (1, 1, 2)]
    assert len({w.writer for w in writers}) == 3
    names: dict[int, list[str]] = {}
    for n, writer in enumerate(writers):
        for batch in range(3):
            for i in range(2):
                latent = np.full((1, 2), n, np.float32)
                files = writer.stage(writer.latent_id(batch, i), latent, {"writer": n})
                writer.commit(files)
                names.setdefault(n, []).extend(files)
    every = [rel for files in names.values() for rel in files]
    assert len(every) == len(set(every)) == 3 * 3 * 2 * 2
    assert sorted(place.list()) == sorted(every)
    for n, files in names.items():                     # each file still holds what its own writer wrote
        for rel in files:
            assert writer_of(rel) == writers[n].writer and folder_file_id(rel)[0] == 4
            if rel.endswith(".json"):
                assert json.loads(place.read(rel)) == {"writer": n}
            else:
                assert np.load(io.BytesIO(place.read(rel)))[0, 0] == n
    place.close()


def test_two_writers_of_one_unit_never_make_the_same_latent_tar_name(place):
    parts = []
    for generation in (1, 1, 2):
        writer = LatentShardWriter(place, "ds", "part-a", writer=new_writer_id(0, generation), maxcount=1,
                                   maxsize=10**9)
        writer.write("k0", np.zeros((1, 2), np.float32), {})
        writer.write("k1", np.ones((1, 2), np.float32), {})
        parts += writer.commit()
    assert len(parts) == len(set(parts)) == 6
    assert sorted(rel for rel in place.list() if rel.endswith(".tar")) == sorted(parts)
    assert {latent_shard_unit(rel) for rel in parts} == {"ds/part-a"}
    assert len({writer_of(rel) for rel in parts}) == 3
    place.close()


def test_latent_shards_split_and_read_back_with_webdataset(place, tmp_path):
    writer = LatentShardWriter(place, "ds", "part-a", writer=W, maxcount=3, maxsize=10**9)
    keys = [writer.write(f"k{i}", np.full((2, 5), i, np.float32), {"i": i}) for i in range(7)]
    assert keys == [f"k{i}" for i in range(7)]
    assert not [rel for rel in place.list() if rel.endswith(".tar")]  # nothing visible before the commit
    parts = writer.commit()
    assert parts == [f"shards/ds/part-a.{W}-{n:03d}.tar" for n in range(3)]
    copies = []
    for i, rel in enumerate(parts):
        copies.append(tmp_path / f"copy-{i}.tar")
        copies[-1].write_bytes(place.read(rel))
    samples = list(wds.WebDataset([str(p) for p in copies], shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == keys
    for s in samples:
        assert s["npy"].shape == (2, 5) and float(s["npy"][0, 0]) == s["json"]["i"]


def test_latent_shards_maxsize_and_duplicate_keys(place):
    writer = LatentShardWriter(place, "ds", "x", writer=W, maxcount=100, maxsize=4096)
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
    writer = LatentShardWriter(place, "ds", "x", writer=W, maxcount=1, maxsize=10**9)
    writer.write("a", np.zeros(1, np.float32), {})
    writer.write("b", np.zeros(1, np.float32), {})  # the first part is finished (uploaded, not completed)
    writer.discard()
    assert place.list() == {}
    if isinstance(place, S3Place):
        assert s3.multipart_uploads("out") == []


def test_identical_inputs_give_identical_tars(place):
    blobs = []
    for run in range(2):
        writer = LatentShardWriter(place, f"ds{run}", "x", writer=new_writer_id(0, run + 1), maxcount=10,
                                   maxsize=10**9)
        writer.write("a", np.ones((2, 2), np.float32), {"z": 1})
        blobs.append(place.read(writer.commit()[0]))
    assert blobs[0] == blobs[1]
    tar = tarfile.open(fileobj=io.BytesIO(blobs[0]))
    assert {m.name: (m.mtime, m.uname, m.mode) for m in tar.getmembers()} == {
        "a.json": (0, "wds-encode", 0o644), "a.npy": (0, "wds-encode", 0o644)}
    assert np.load(io.BytesIO(tar.extractfile("a.npy").read())).sum() == 4


def test_old_latent_ids_and_folder_file_names_parse_back():
    assert parse_latent_id("0030000420007") == (3, 42, 7)
    assert parse_latent_id("12340000010002") == (1234, 1, 2)
    assert parse_latent_id("abc") is None
    assert parse_latent_id(f"{W}-000042-0007") is None          # only older versions' ids
    assert folder_file_id("3/0030000420007.npy") == (3, "0030000420007")
    assert folder_file_id("3/0030000420007.json.partial") == (3, "0030000420007")
    assert folder_file_id("3/notes.txt") is None and folder_file_id("shards/a.tar") is None


def test_new_folder_file_names_parse_back():
    assert folder_file_id("3/r3-g1-a1b2c3-000012-0001.npy") == (3, "r3-g1-a1b2c3-000012-0001")
    assert folder_file_id("3/r3-g1-a1b2c3-000012-0001.json") == (3, "r3-g1-a1b2c3-000012-0001")
    assert folder_file_id("3/r3-g1-a1b2c3-000012-0001.npy.partial") == (3, "r3-g1-a1b2c3-000012-0001")
    assert folder_file_id("12/r12-g40-ffffff-123456-9999.npy") == (12, "r12-g40-ffffff-123456-9999")
    for bad in ("3/r3-g1-a1b2c3.npy", "3/r3-g1-a1b2c3-000012-0001.txt", "3/r3-g1-A1B2C3-000012-0001.npy",
                "3/x-r3-g1-a1b2c3-000012-0001.npy", "shards/ds/r3-g1-a1b2c3-000012-0001.npy"):
        assert folder_file_id(bad) is None, bad
    writer = FolderWriter(None, rank=5, writer=new_writer_id(5, 2))
    latent_id = writer.latent_id(7, 3)
    assert [folder_file_id(rel) for rel in folder_files(5, latent_id)] == [(5, latent_id)] * 2


@pytest.mark.parametrize("relative, unit", [
    ("shards/music/part-000001.r0-g1-a1b2c3-002.tar", "music/part-000001"),
    ("shards/music/part-000001.r0-g1-a1b2c3-002.tar.partial", "music/part-000001"),
    ("shards/music/sub/dir/x.y.r10-g3-0f0f0f-000.tar", "music/sub/dir/x.y"),
    ("shards/music/part-000001-002.tar", "music/part-000001"),              # an older version's tar
    ("shards/music/part-000001-002.tar.partial", "music/part-000001"),
    ("shards/music/a.b-0001.tar", "music/a.b"),
    ("shards/music/notes.txt", None),
    ("shards/music.tar", None),
    ("0/r0-g1-a1b2c3-000000-0000.npy", None),
])
def test_latent_shard_names_give_their_unit(relative, unit):
    assert latent_shard_unit(relative) == unit


def test_latent_shard_writer_names_parse_back_to_the_unit_and_writer(place):
    wid = new_writer_id(2, 5)
    writer = LatentShardWriter(place, "music", "sub/part-000001", writer=wid, maxcount=1, maxsize=10**9)
    for i in range(3):
        writer.write(f"k{i}", np.zeros((1, 1), np.float32), {})
    parts = writer.commit()
    assert parts == [f"shards/music/sub/part-000001.{wid}-{n:03d}.tar" for n in range(3)]
    assert [(latent_shard_unit(rel), writer_of(rel)) for rel in parts] == [("music/sub/part-000001", wid)] * 3
    place.close()


@pytest.mark.parametrize("relative, writer", [
    ("3/r3-g1-a1b2c3-000012-0001.npy", "r3-g1-a1b2c3"),
    ("3/r3-g1-a1b2c3-000012-0001.json.partial", "r3-g1-a1b2c3"),
    ("shards/music/part-000001.r0-g1-a1b2c3-002.tar", "r0-g1-a1b2c3"),
    ("shards/music/part-000001.r0-g12-a1b2c3-002.tar.partial", "r0-g12-a1b2c3"),
    ("shards/music/sub/part.r7-g2-abcdef-000.tar", "r7-g2-abcdef"),
    # names of older versions carry no writer
    ("3/0030000420007.npy", None),
    ("shards/music/part-000001-002.tar", None),
    ("manifest/log/3/000000001.json", None),
    ("details.json", None),
    # not a writer id: too few hex digits, upper case, not at a name's start
    ("3/r3-g1-a1b2c-000012-0001.npy", None),
    ("3/r3-g1-A1B2C3-000012-0001.npy", None),
    ("shards/music/xr0-g1-a1b2c3-002.tar", None),
])
def test_writer_of_names_the_writer_of_new_names_only(relative, writer):
    assert writer_of(relative) == writer


def test_writer_of_a_latent_tar_is_its_writer_whatever_the_unit_is_called():
    # a unit named like a writer id: the writer id is the one the LatentShardWriter appended, before the part
    assert writer_of("shards/ds/r1-g2-abcdef-000.r0-g1-123456-000.tar") == "r0-g1-123456"
    assert writer_of("shards/r1-g2-abcdef-x/part.r0-g1-123456-000.tar") == "r0-g1-123456"
    assert writer_of("shards/ds/r1-g2-abcdef-000.tar") is None        # an older version's tar: no writer
