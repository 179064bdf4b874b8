"""manifest.py: run identity, refusal to mix runs, per-unit records, clean-up after interrupted ranks."""

import json

import pytest

from wds_encode.pipeline.manifest import IDENTITY_OPTIONS, ManifestError, RankLog, RunManifest, run_identity
from wds_encode.storage import LocalPlace, S3Place

OPTIONS = {k: None for k in IDENTITY_OPTIONS} | {"sample_size": 1024, "latent_mode": "sample", "seed": 0}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "w.ckpt"
    path.write_bytes(b"weights-1")
    return path


def test_identity_changes_with_weights_config_and_options(tmp_path, ckpt):
    base = run_identity({"a": 1}, ckpt, OPTIONS, True)
    assert base == run_identity({"a": 1}, ckpt, dict(OPTIONS), True)
    assert base["hash"] != run_identity({"a": 2}, ckpt, OPTIONS, True)["hash"]
    assert base["hash"] != run_identity({"a": 1}, ckpt, {**OPTIONS, "sample_size": 2048}, True)["hash"]
    assert base["hash"] != run_identity({"a": 1}, ckpt, OPTIONS, False)["hash"]
    other = tmp_path / "w2.ckpt"
    other.write_bytes(b"weights-2")
    assert base["hash"] != run_identity({"a": 1}, other, OPTIONS, True)["hash"]


def test_resume_skips_done_units_and_refuses_another_model(place, ckpt):
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(place)
    assert manifest.prepare(ident, overwrite=False).done == set()
    manifest.write_details({"run_identity": ident})
    manifest.write_record({"shard": "ds/a", "samples": 3})
    manifest.write_record({"shard": "ds/b", "samples": 3})
    place.write("manifest/ds__c.json", b"{broken")
    assert RunManifest(place).prepare(ident, overwrite=False).done == {"ds/a", "ds/b"}

    changed = run_identity({"a": 1}, ckpt, {**OPTIONS, "latent_mode": "mean"}, True)
    with pytest.raises(ManifestError, match="options.latent_mode"):
        RunManifest(place).prepare(changed, overwrite=False)
    assert RunManifest(place).prepare(changed, overwrite=True).done == set()
    assert RunManifest(place).records() == []


def test_error_log_is_written_from_the_records(place):
    manifest = RunManifest(place)
    manifest.write_record({"shard": "ds/b", "problems": [{"level": "warning", "key": "b"},
                                                         {"level": "error", "key": "c"}]})
    manifest.write_record({"shard": "ds/a", "problems": [{"level": "error", "key": "a"}]})
    manifest.write_record({"shard": "ds/z", "problems": []})
    assert manifest.write_error_log() == 3
    lines = [json.loads(line) for line in place.read("errors.jsonl").decode().splitlines()]
    assert [r["key"] for r in lines] == ["a", "b", "c"]


def _put(place, *names):
    for name in names:
        place.write(name, b"x")


def test_overwrite_removes_earlier_outputs_only(place, ckpt):
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(place)
    manifest.prepare(ident, overwrite=False)
    manifest.write_details({"run_identity": ident})
    manifest.write_record({"shard": "ds/a", "problems": [{"level": "error"}]})
    manifest.write_error_log()
    manifest.write_filelist()
    _put(place, "0/0000000000000.npy", "0/0000000000000.json", "0/0000000010000.npy.partial", "0/notes.txt",
         "shards/ds/a-000.tar", "mine.txt", "silence.npy")
    assert {"filelist.txt", "silence.npy"} <= set(place.list())
    assert RunManifest(place).prepare(ident, overwrite=True).done == set()
    assert sorted(place.list()) == ["0/notes.txt", "mine.txt"]


def test_an_interrupted_rank_leaves_nothing_that_no_record_lists(place, ckpt, s3):
    """A rank killed mid-unit (or between its uploads and its record) left objects; the next run
    removes exactly those, keeps every committed one, and continues batch ids past all of them."""
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(place)
    manifest.prepare(ident, overwrite=False)
    manifest.write_details({"run_identity": ident})
    committed = ["1/0010000050000.json", "1/0010000050000.npy", "shards/ds/done-000.tar"]
    manifest.write_record({"shard": "ds/done", "rank": 1, "folder_ids": ["0010000050000"],
                           "latent_shards": ["shards/ds/done-000.tar"]})
    orphans = ["1/0010000070001.json", "1/0010000070001.npy", "1/0010000080000.npy.partial",
               "shards/ds/half-000.tar", "shards/ds/half-001.tar.partial"]
    other_rank = ["2/0020000030000.npy", "2/0020000030000.json"]  # rank 2 finished cleanly: not listed
    _put(place, *committed, *orphans, *other_rank, "1/notes.txt")
    manifest.write_record({"shard": "ds/other", "rank": 2, "folder_ids": ["0020000030000"], "latent_shards": []})
    marker = manifest.start_writing(1, first_batch=5)
    if isinstance(place, S3Place):  # an upload that was in flight when the rank died
        place.open_object("shards/ds/half-002.tar").finish()
        assert s3.multipart_uploads("out")

    state = RunManifest(place).prepare(ident, overwrite=False)
    assert state.done == {"ds/done", "ds/other"} and state.interrupted_ranks == [1]
    assert state.next_batch == {1: 9, 2: 4}  # past the removed batch 8 too: no id is ever reused
    left = set(place.list())
    assert set(committed) | set(other_rank) | {"1/notes.txt"} <= left
    assert not left & set(orphans) and marker not in left
    if isinstance(place, S3Place):
        assert s3.multipart_uploads("out") == []
    assert RunManifest(place).writing_markers() == []


def test_details_never_hold_credentials(place):
    manifest = RunManifest(place)
    manifest.write_details({"args": {"s3_endpoint_url": "http://minio:s3cr3t@127.0.0.1:9000", "seed": 1},
                            "dataset_config": {"datasets": [{"id": "a", "aws_secret_access_key": "s3cr3t",
                                                             "num_tokens": 5}]}})
    text = place.read("details.json").decode()
    assert "s3cr3t" not in text and "http://***@127.0.0.1:9000" in text and '"num_tokens": 5' in text


def test_filelist_lists_exactly_the_windows_the_records_list(place):
    manifest = RunManifest(place)
    assert manifest.write_filelist() == 0 and place.read("filelist.txt") == b""  # nothing committed yet
    manifest.write_record({"shard": "ds/b", "rank": 1, "folder_ids": ["0010000020001", "0010000020000"]})
    manifest.write_record({"shard": "ds/a", "rank": 0, "folder_ids": ["0000000070000"]})
    manifest.write_record({"shard": "ds/c", "rank": 12, "folder_ids": []})     # a unit without windows
    manifest.write_record({"shard": "ds/d", "rank": 0})                         # no folder layout
    _put(place, "1/0010000090000.npy", "1/0010000090000.json")  # written, never recorded: not listed
    assert manifest.write_filelist() == 3
    assert place.read("filelist.txt").decode().splitlines(keepends=True) == [
        "0/0000000070000.npy\n", "1/0010000020000.npy\n", "1/0010000020001.npy\n"]
    manifest.write_record({"shard": "ds/e", "rank": 0, "folder_ids": ["0000000080000"]})
    assert manifest.write_filelist(manifest.records()[:1]) == 1  # rewritten whole from the records given
    assert place.read("filelist.txt") == b"0/0000000070000.npy\n"
    assert not [rel for rel in place.list() if rel.endswith(".partial")]


# ---------------------------------------------------------------------- records, their index, compaction

class Counted:
    """A Place that counts what readers ask of it: listings, and objects read (one request each)."""

    def __init__(self, place):
        self.place, self.lists, self.reads = place, 0, 0

    def __getattr__(self, name):
        return getattr(self.place, name)

    def list(self, prefix="", start_after=""):
        self.lists += 1
        return self.place.list(prefix, start_after=start_after)

    def read(self, rel):
        self.reads += 1
        return self.place.read(rel)

    def read_many(self, rels):
        self.reads += len(rels)
        return self.place.read_many(rels)


def commit_units(manifest, rank, names, close=True, **kw):
    log = RankLog(manifest, rank, **kw)
    for name in names:
        log.commit({"shard": f"ds/{name}", "samples": 1, "windows": 1, "folder_ids": [], "latent_shards": []})
    if close:
        log.close()
    return log


def test_a_reader_needs_the_same_few_requests_for_5_or_500_done_units(place):
    counts = {}
    for n in (5, 500):
        sub = S3Place(place.storage, place.url + f"n{n}/") if isinstance(place, S3Place) else LocalPlace(f"{place.url}/n{n}")
        commit_units(RunManifest(sub), 0, [f"u{i:04d}" for i in range(n // 2)])
        commit_units(RunManifest(sub), 1, [f"v{i:04d}" for i in range(n - n // 2)])
        counted = Counted(sub)
        records = RunManifest(counted).records()
        assert len(records) == n == len({r["shard"] for r in records})
        counts[n] = (counted.lists, counted.reads)
    assert counts[5] == counts[500], counts
    assert sum(counts[500]) <= 6, counts      # index listing + index objects + the writing markers


def test_records_not_yet_indexed_are_read_from_the_marked_ranks_tails(tmp_path):
    place = LocalPlace(tmp_path)
    commit_units(RunManifest(place), 0, ["a", "b"])                       # indexed, marker gone
    running = commit_units(RunManifest(place), 1, ["c", "d"], close=False, index_every=0.0)  # indexed each commit
    running.index_every = 3600.0
    running.commit({"shard": "ds/e", "samples": 1})                        # after its last index
    found = RunManifest(place).read_records()
    assert [r["shard"] for r in found.records] == ["ds/a", "ds/b", "ds/c", "ds/d", "ds/e"]
    assert [r["shard"] for r in found.uncompacted] == ["ds/e"]
    assert len(found.index_names) == 2      # rank 0's, and rank 1's latest (its earlier one was replaced)


def test_prepare_indexes_an_interrupted_ranks_records_before_its_marker_goes(tmp_path, ckpt):
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    RunManifest(place).write_details({"run_identity": ident})
    commit_units(RunManifest(place), 2, ["a", "b", "c"], close=False)     # killed: no index, marker left
    state = RunManifest(place).prepare(ident, overwrite=False)
    assert state.interrupted_ranks == [2] and state.done == {"ds/a", "ds/b", "ds/c"} and state.next_seq == {2: 3}
    assert RunManifest(place).writing_markers() == []
    found = RunManifest(place).read_records()
    assert len(found.records) == 3 and found.uncompacted == [] and len(found.index_names) == 1


def test_compaction_merges_every_index_and_a_crash_midway_leaves_indexes_that_agree(tmp_path):
    place = LocalPlace(tmp_path)
    for rank in range(4):
        commit_units(RunManifest(place), rank, [f"r{rank}u{i}" for i in range(3)])
    manifest = RunManifest(place)
    before = manifest.read_records()
    assert len(before.index_names) == 4
    manifest.write_index(before.records)          # a merge that crashed before removing what it replaces
    assert [r["shard"] for r in manifest.records()] == [r["shard"] for r in before.records]
    assert manifest.compact() == 5
    after = manifest.read_records()
    assert len(after.index_names) == 1 and [r["shard"] for r in after.records] == [r["shard"] for r in before.records]
    assert manifest.compact() == 0                # nothing left to merge


def test_an_index_never_lists_a_record_that_was_not_written(tmp_path):
    place = LocalPlace(tmp_path)
    log = commit_units(RunManifest(place), 0, ["a"], close=False, index_every=0.0)

    def refuse(rel, data):
        raise OSError("disk gone")
    place.write, real = refuse, place.write
    with pytest.raises(OSError):
        log.commit({"shard": "ds/b", "samples": 1})
    place.write = real
    log.close()
    assert [r["shard"] for r in RunManifest(LocalPlace(tmp_path)).records()] == ["ds/a"]


def test_records_of_an_older_version_are_read_and_indexed_by_the_next_prepare(tmp_path, ckpt):
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    RunManifest(place).write_details({"run_identity": ident})
    for name in ("a", "b"):   # the layout before records were numbered: manifest/DATASET__UNIT.json
        place.write(f"manifest/ds__{name}.json", json.dumps({"shard": f"ds/{name}", "rank": 0}).encode())
    assert {r["shard"] for r in RunManifest(place).records()} == {"ds/a", "ds/b"}
    assert RunManifest(place).prepare(ident, overwrite=False).done == {"ds/a", "ds/b"}
    commit_units(RunManifest(place), 0, ["c"])
    found = RunManifest(place).read_records()
    assert {r["shard"] for r in found.records} == {"ds/a", "ds/b", "ds/c"} and found.index_names


def test_overwrite_removes_the_index_with_the_records(tmp_path, ckpt):
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    commit_units(RunManifest(place), 0, ["a", "b"])
    assert RunManifest(place).prepare(ident, overwrite=True).done == set()
    assert RunManifest(place).records() == [] and not list((tmp_path / "manifest").rglob("*.json*"))
