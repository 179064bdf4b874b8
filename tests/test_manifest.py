"""manifest.py: run identity, refusal to mix runs, per-unit records, clean-up after interrupted ranks."""

import json

import pytest

from wds_encode.pipeline.manifest import IDENTITY_OPTIONS, ManifestError, RunManifest, run_identity
from wds_encode.storage import S3Place

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
