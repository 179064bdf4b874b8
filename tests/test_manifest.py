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
         "shards/ds/a-000.tar", "mine.txt", "silence.npy", "manifest/parts/part-0-of-2.json")
    place.write("manifest/parts/job.lease", b"{}")   # the lease the overwriting run holds: taken before the clear
    assert {"filelist.txt", "silence.npy"} <= set(place.list())
    assert RunManifest(place).prepare(ident, overwrite=True).done == set()
    assert sorted(place.list()) == ["0/notes.txt", "manifest/parts/job.lease", "mine.txt"]


W1, W2 = "r1-g1-aaaaaa", "r2-g1-bbbbbb"   # writer ids (writers.new_writer_id)
PART_LEASE = {"lease": "manifest/parts/job.lease"}


def test_a_dead_writer_leaves_nothing_that_no_record_lists(place, ckpt, s3):
    """A writer killed mid-unit (or between its uploads and its record) left objects; the next holder of
    the lease (a later generation) removes exactly those, and keeps every committed object and every
    object of a writer that is still alive."""
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(place)
    manifest.prepare(ident, overwrite=False)
    manifest.write_details({"run_identity": ident})
    committed = [f"1/{W1}-000005-0000.json", f"1/{W1}-000005-0000.npy", f"shards/ds/done.{W1}-000.tar"]
    manifest.write_record({"shard": "ds/done", "rank": 1, "folder_ids": [f"{W1}-000005-0000"],
                           "latent_shards": [f"shards/ds/done.{W1}-000.tar"]})
    orphans = [f"1/{W1}-000007-0001.json", f"1/{W1}-000007-0001.npy", f"1/{W1}-000008-0000.npy.partial",
               f"shards/ds/half.{W1}-000.tar", f"shards/ds/half.{W1}-001.tar.partial"]
    finished = [f"2/{W2}-000003-0000.npy", f"2/{W2}-000003-0000.json"]  # a writer that finished cleanly
    live = "r1-g5-cccccc"   # a writer of another attempt whose lease is alive: its objects in flight stay
    in_flight = [f"1/{live}-000001-0000.npy", f"shards/ds/half.{live}-000.tar"]
    _put(place, *committed, *orphans, *finished, *in_flight, "1/notes.txt")
    manifest.write_record({"shard": "ds/other", "rank": 2, "folder_ids": [f"{W2}-000003-0000"], "latent_shards": []})
    marker = manifest.start_writing(W1, 1, lease={**PART_LEASE, "generation": 1})
    place.write("manifest/parts/other.lease", json.dumps({"generation": 5, "owner": "x"}).encode())
    live_marker = manifest.start_writing(live, 1, lease={"lease": "manifest/parts/other.lease", "generation": 5})
    if isinstance(place, S3Place):  # an upload that was in flight when the writer died, and a live one's
        place.open_object(f"shards/ds/half.{W1}-002.tar").finish()
        place.open_object(f"shards/ds/half.{live}-001.tar").finish()
        assert len(s3.multipart_uploads("out")) == 2

    state = RunManifest(place).prepare(ident, overwrite=False, lease={**PART_LEASE, "generation": 2})
    assert state.done == {"ds/done", "ds/other"} and state.dead_writers == [W1]
    left = set(place.list())
    assert set(committed) | set(finished) | set(in_flight) | {"1/notes.txt"} <= left
    assert not left & set(orphans) and marker not in left and live_marker in left
    if isinstance(place, S3Place):
        assert [key.rsplit("/", 1)[1] for key in s3.multipart_uploads("out")] == [f"half.{live}-001.tar"]
    assert [m["writer"] for m in RunManifest(place).writing_markers()] == [live]


def test_a_unit_commits_once_and_a_second_commit_is_refused(place):
    manifest = RunManifest(place)
    first = manifest.write_record({"shard": "ds/a", "writer": W1, "folder_ids": ["x"]})
    assert first is not None and first["writer"] == W1
    assert manifest.write_record({"shard": "ds/a", "writer": W2, "folder_ids": ["y"]}) is None
    assert [r["writer"] for r in manifest.records()] == [W1]


def test_a_refused_commit_is_still_found_through_the_refused_writers_journal(tmp_path):
    """A unit whose record no index and no marked writer's journal names (its writer was taken for dead
    and its marker removed) is found again once another writer's commit of it is refused."""
    place = LocalPlace(tmp_path)
    commit_units(RunManifest(place), W1, ["a"])                      # indexed
    RunManifest(place).write_record({"shard": "ds/b", "writer": "r0-g1-dddddd"})   # no journal, no marker
    assert [r["shard"] for r in RunManifest(place).records()] == ["ds/a"]
    log = commit_units(RunManifest(place), W2, ["b", "c"])
    assert log.refused == 1
    records = RunManifest(place).records()
    assert [(r["shard"], r["writer"]) for r in records] == [("ds/a", W1), ("ds/b", "r0-g1-dddddd"), ("ds/c", W2)]


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
    manifest.write_record({"shard": "ds/b", "rank": 1, "folder_ids": [f"{W1}-000002-0001", f"{W1}-000002-0000"]})
    manifest.write_record({"shard": "ds/a", "rank": 0, "folder_ids": ["0000000070000"]})   # an older version's id
    manifest.write_record({"shard": "ds/c", "rank": 12, "folder_ids": []})     # a unit without windows
    manifest.write_record({"shard": "ds/d", "rank": 0})                         # no folder layout
    _put(place, f"1/{W1}-000009-0000.npy", f"1/{W1}-000009-0000.json")  # written, never recorded: not listed
    assert manifest.write_filelist() == 3
    assert place.read("filelist.txt").decode().splitlines(keepends=True) == [
        "0/0000000070000.npy\n", f"1/{W1}-000002-0000.npy\n", f"1/{W1}-000002-0001.npy\n"]
    manifest.start_filelist()                                                   # never over an existing one
    assert len(place.read("filelist.txt").decode().splitlines()) == 3
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


def commit_units(manifest, writer, names, close=True, **kw):
    log = RankLog(manifest, writer, int(writer[1:].split("-")[0]), **kw)
    for name in names:
        log.commit({"shard": f"ds/{name}", "samples": 1, "windows": 1, "folder_ids": [], "latent_shards": []})
        log.index_if_due()
    if close:
        log.close()
    return log


def test_a_reader_needs_the_same_few_requests_for_5_or_500_done_units(place):
    counts = {}
    for n in (5, 500):
        sub = S3Place(place.storage, place.url + f"n{n}/") if isinstance(place, S3Place) else LocalPlace(f"{place.url}/n{n}")
        commit_units(RunManifest(sub), "r0-g1-000000", [f"u{i:04d}" for i in range(n // 2)])
        commit_units(RunManifest(sub), "r1-g1-111111", [f"v{i:04d}" for i in range(n - n // 2)])
        counted = Counted(sub)
        records = RunManifest(counted).records()
        assert len(records) == n == len({r["shard"] for r in records})
        counts[n] = (counted.lists, counted.reads)
    assert counts[5] == counts[500], counts
    assert sum(counts[500]) <= 6, counts      # index listing + index objects + the writing markers


def test_records_not_yet_indexed_are_read_from_the_marked_writers_journals(tmp_path):
    place = LocalPlace(tmp_path)
    commit_units(RunManifest(place), W1, ["a", "b"])                       # indexed, marker gone
    running = commit_units(RunManifest(place), W2, ["c", "d"], close=False, index_every=0.0)  # indexed each commit
    running.index_every = 3600.0
    running.commit({"shard": "ds/e", "samples": 1})                        # after its last index
    found = RunManifest(place).read_records()
    assert [r["shard"] for r in found.records] == ["ds/a", "ds/b", "ds/c", "ds/d", "ds/e"]
    assert [r["shard"] for r in found.uncompacted] == ["ds/e"]
    assert len(found.index_names) == 2      # W1's, and W2's latest (its earlier one was replaced)


def test_prepare_indexes_a_dead_writers_records_before_its_marker_goes(tmp_path, ckpt):
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    RunManifest(place).write_details({"run_identity": ident})
    commit_units(RunManifest(place), W2, ["a", "b", "c"], close=False,
                 lease={**PART_LEASE, "generation": 1})                    # killed: no index, marker left
    state = RunManifest(place).prepare(ident, overwrite=False, lease={**PART_LEASE, "generation": 2})
    assert state.interrupted_ranks == [2] and state.done == {"ds/a", "ds/b", "ds/c"}
    assert RunManifest(place).writing_markers() == []
    found = RunManifest(place).read_records()
    assert len(found.records) == 3 and found.uncompacted == [] and len(found.index_names) == 1


def test_a_record_left_half_created_by_a_killed_writer_is_removed_for_the_units_of_this_part(tmp_path, ckpt):
    """Killed between writing a record's temporary file and linking it into place: the next holder of the
    part removes the temporary file of a unit of its part, never that of another part's unit (whose
    holder may be creating it now)."""
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    RunManifest(place).write_details({"run_identity": ident})
    commit_units(RunManifest(place), W2, ["a"], close=False, lease={**PART_LEASE, "generation": 1})
    done = tmp_path / "manifest/done/ds"
    mine, theirs = done / "b.json.4242-0a1b2c3d.partial", done / "z.json.77-0a1b2c3d.partial"
    mine.write_bytes(b"{}")
    theirs.write_bytes(b"{}")
    state = RunManifest(place).prepare(ident, overwrite=False, units={"ds/a", "ds/b"},
                                       lease={**PART_LEASE, "generation": 2})
    assert state.dead_writers == [W2] and state.done == {"ds/a"}
    assert not mine.exists() and theirs.exists()


def test_a_live_writers_marker_is_left_alone(tmp_path, ckpt):
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    commit_units(RunManifest(place), W2, ["a"], close=False, lease={**PART_LEASE, "generation": 3})
    state = RunManifest(place).prepare(ident, overwrite=False, lease={**PART_LEASE, "generation": 3})
    assert state.dead_writers == [] and len(RunManifest(place).writing_markers()) == 1


def test_compaction_merges_every_index_and_a_crash_midway_leaves_indexes_that_agree(tmp_path):
    place = LocalPlace(tmp_path)
    for rank in range(4):
        commit_units(RunManifest(place), f"r{rank}-g1-00000{rank}", [f"r{rank}u{i}" for i in range(3)])
    manifest = RunManifest(place)
    before = manifest.read_records()
    assert len(before.index_names) == 4
    manifest.write_index(before.records)          # a merge that crashed before removing what it replaces
    assert [r["shard"] for r in manifest.records()] == [r["shard"] for r in before.records]
    assert manifest.compact() == 5
    after = manifest.read_records()
    assert len(after.index_names) == 1 and [r["shard"] for r in after.records] == [r["shard"] for r in before.records]
    assert manifest.compact() == 0                # nothing left to merge


def test_a_temporary_index_file_is_never_read(tmp_path):
    """A SIGKILL while an index object is written leaves its temporary file: readers never see it."""
    place = LocalPlace(tmp_path)
    commit_units(RunManifest(place), W1, ["a"])
    (tmp_path / "manifest" / "index" / "00000000000000000001-r0-g1-x.json.gz.123-abcdef01.partial").write_bytes(b"\x1f\x8b")
    assert [r["shard"] for r in RunManifest(place).records()] == ["ds/a"]


def test_an_index_never_lists_a_record_that_was_not_written(tmp_path):
    place = LocalPlace(tmp_path)
    log = commit_units(RunManifest(place), W1, ["a"], close=False, index_every=0.0)

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
    commit_units(RunManifest(place), W1, ["c"])
    found = RunManifest(place).read_records()
    assert {r["shard"] for r in found.records} == {"ds/a", "ds/b", "ds/c"} and found.index_names


def test_overwrite_removes_the_index_with_the_records(tmp_path, ckpt):
    place = LocalPlace(tmp_path)
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    commit_units(RunManifest(place), W1, ["a", "b"])
    assert RunManifest(place).prepare(ident, overwrite=True).done == set()
    assert RunManifest(place).records() == [] and not list((tmp_path / "manifest").rglob("*.json*"))


def _commit_and_rewrite_the_filelist(url: str, endpoint: "str | None", writer: str, count: int) -> None:
    from race_support import open_place
    manifest = RunManifest(open_place(url, endpoint))
    for i in range(count):
        manifest.write_record({"shard": f"ds/{writer}-{i}", "rank": 0, "folder_ids": [f"{writer}-{i:06d}-0000"]})
        manifest.write_filelist()


def test_parts_rewriting_the_filelist_at_once_lose_no_window(place):
    """Row 8: several parts commit and rewrite filelist.txt at the same moments; the last view written holds
    every window committed before it (each rewrite is conditional on the version it read)."""
    import multiprocessing
    writers = [f"r{k}-g1-{k:06x}" for k in range(4)]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_commit_and_rewrite_the_filelist, args=(place.url, None, w, 6))   # S3: the test's AWS_* environment
                 for w in writers]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    lines = place.read("filelist.txt").decode().splitlines()
    assert lines == sorted(f"0/{w}-{i:06d}-0000.npy" for w in writers for i in range(6))


def _commit_close_and_merge(root: str, writers: int, units: int) -> None:
    """Writers one after another, each committing, indexing as it goes, closing; a merge after each."""
    manifest = RunManifest(LocalPlace(root))
    for w in range(writers):
        log = RankLog(manifest, f"r0-g{w + 1}-{w:06x}", 0, index_every=0.0)
        for i in range(units):
            log.commit({"shard": f"ds/w{w}-u{i}", "folder_ids": [], "latent_shards": []})
            log.index_if_due()
        log.close()
        manifest.compact()


def test_a_reader_racing_writers_that_close_and_merges_never_sees_a_unit_vanish(tmp_path):
    """Readers read a snapshot: however a read interleaves with a writer removing its marker after its index
    and with merges removing index objects, a unit committed before a read began is in it."""
    import multiprocessing
    context = multiprocessing.get_context("fork")   # the child only writes files
    writer = context.Process(target=_commit_close_and_merge, args=(str(tmp_path), 40, 4))
    writer.start()
    import time

    class Lingering(LocalPlace):
        """A reader slow between its requests, so that writers and merges move while it reads."""

        def list(self, prefix="", start_after=""):
            found = super().list(prefix, start_after)
            time.sleep(0.01)
            return found

    seen: set[str] = set()
    while writer.is_alive():
        before = {r["shard"] for r in RunManifest(LocalPlace(tmp_path)).records()}  # committed before the next read
        found = {r["shard"] for r in RunManifest(Lingering(str(tmp_path))).records()}
        assert before <= found, f"{len(before - found)} committed units vanished: {sorted(before - found)[:3]}"
        seen |= found
    writer.join()
    assert writer.exitcode == 0
    assert len({r["shard"] for r in RunManifest(LocalPlace(tmp_path)).records()}) == 40 * 4
