"""storage/s3.py: listing, places and multipart objects on a real S3 protocol (moto, FaultProxy)."""


import pytest

import wds_encode.storage.s3 as s3_mod
from wds_encode.storage import PROBE_DIR, StorageError, Tagged

from conftest import MiB, random_bytes
from s3_support import fast_retries, record_requests
from race_support import race


def test_slow_down_answers_are_retried_and_counted(s3, fault_proxy, proxied, monkeypatch):
    fast_retries(monkeypatch)
    bucket = s3.make_bucket("src")
    tars = {f"data/{i}.tar": random_bytes(1000 + i, seed=i) for i in range(3)}
    for key, data in tars.items():
        s3.put(bucket, key, data)
    fault_proxy.fail_503_every = 2

    assert proxied.list_tars("s3://src/data/") == [(f"s3://src/{k}", len(v)) for k, v in sorted(tars.items())]
    for key, data in tars.items():
        assert proxied.read_bytes(f"s3://src/{key}") == data
    place = proxied.place("s3://src/out/")
    place.write("details.json", b"{}")
    assert place.read("details.json") == b"{}"
    place.stage("0/a.npy", b"npy")
    place.publish(["0/a.npy"])
    assert place.list() == {"details.json": 2, "0/a.npy": 3}
    place.close()

    assert fault_proxy.counts["errors_503"] >= 4
    assert proxied.retries == fault_proxy.counts["errors_503"]  # every refused request was repeated, once
    assert proxied.resumes == 0


# ---------------------------------------------------------------------- listing inputs

def test_list_tars_is_recursive_sorted_tar_only_with_sizes(s3, storage):
    bucket = s3.make_bucket("src")
    for key, size in {"data/b.tar": 2, "data/a.tar": 1, "data/sub/deep/c.tar": 3, "data/readme.txt": 4,
                      "data/d.tar.gz": 5, "data-old/e.tar": 6, "f.tar": 7}.items():
        s3.put(bucket, key, b"x" * size)
    expected = [("s3://src/data/a.tar", 1), ("s3://src/data/b.tar", 2), ("s3://src/data/sub/deep/c.tar", 3)]
    assert storage.list_tars("s3://src/data/") == expected
    assert storage.list_tars("s3://src/data") == expected  # a folder, not a key prefix: no data-old/
    assert storage.list_tars("s3://src") == [("s3://src/data-old/e.tar", 6), *expected, ("s3://src/f.tar", 7)]
    assert storage.list_tars("s3://src/nothing/") == []


def test_list_tars_reads_every_page(s3, fault_proxy, proxied):
    bucket = s3.make_bucket("src")
    for i in range(30):
        s3.put(bucket, f"data/{i:02d}.tar", b"t" * i)

    def small_pages(params, **_kwargs):
        params["MaxKeys"] = 7
    proxied.client().meta.events.register("before-parameter-build.s3.ListObjectsV2", small_pages)
    requests, _held = record_requests(fault_proxy)
    assert proxied.list_tars("s3://src/data/") == [(f"s3://src/data/{i:02d}.tar", i) for i in range(30)]
    listings = [target for method, target, _headers in requests if "list-type=2" in target]
    assert len(listings) == 5 and all("max-keys=7" in target for target in listings)


def test_list_tars_of_one_tar_url_is_that_tar(s3, storage):
    bucket = s3.make_bucket("src")
    s3.put(bucket, "data/one.tar", b"x" * 10)
    s3.put(bucket, "data/one.tar/inner.tar", b"y")  # a key under it must not be listed instead
    assert storage.list_tars("s3://src/data/one.tar") == [("s3://src/data/one.tar", 10)]
    with pytest.raises(StorageError, match=r"^s3://src/data/two.tar: cannot read: 404"):
        storage.list_tars("s3://src/data/two.tar")


def test_list_tars_of_a_missing_bucket_names_no_such_bucket(s3, storage):
    with pytest.raises(StorageError) as failed:
        storage.list_tars("s3://nobucket/data/")
    assert str(failed.value).startswith("s3://nobucket/data/: cannot list: NoSuchBucket")


# ---------------------------------------------------------------------- output places

def test_check_writable_s3_missing_bucket_fails_with_no_such_bucket(s3, storage):
    with pytest.raises(StorageError) as failed:
        storage.place("s3://nobucket/run/").check_writable()
    assert str(failed.value).startswith(f"s3://nobucket/run/{PROBE_DIR}/")
    assert "cannot write: NoSuchBucket" in str(failed.value)


def test_check_writable_s3_leaves_no_probe_object(s3, storage):
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run")
    assert place.url == "s3://out/run/"
    place.check_writable()
    assert s3.keys(bucket) == {}
    assert s3.multipart_uploads(bucket) == []


def test_s3_object_larger_than_a_part_is_a_multipart_upload_visible_on_commit(s3, storage, monkeypatch):
    monkeypatch.setattr(s3_mod, "PART_SIZE", 5 * MiB)  # S3's minimum part size
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    data = random_bytes(12 * MiB)
    writer = place.open_object("shards/ds/a.tar")
    for start in range(0, len(data), 256 << 10):
        writer.write(data[start:start + (256 << 10)])
    writer.finish()
    assert s3.keys(bucket) == {}  # every part sent, no object yet
    assert s3.multipart_uploads(bucket) == ["run/shards/ds/a.tar"]
    writer.commit()
    assert s3.get(bucket, "run/shards/ds/a.tar") == data
    head = s3.client().head_object(Bucket=bucket, Key="run/shards/ds/a.tar")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB: three parts
    assert s3.multipart_uploads(bucket) == []
    place.close()


def test_s3_aborted_object_leaves_no_key_and_no_upload(s3, storage, monkeypatch):
    monkeypatch.setattr(s3_mod, "PART_SIZE", 5 * MiB)
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    writer = place.open_object("shards/ds/a.tar")
    writer.write(random_bytes(7 * MiB))  # one part sent, the rest buffered
    assert s3.multipart_uploads(bucket) == ["run/shards/ds/a.tar"]
    writer.abort()
    assert s3.keys(bucket) == {}
    assert s3.multipart_uploads(bucket) == []
    place.close()


def test_s3_empty_streamed_object_commits_as_an_empty_object(s3, storage):
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    writer = place.open_object("empty.tar")
    writer.commit()
    place.close()
    assert s3.keys(bucket) == {"run/empty.tar": 0}


def test_s3_remove_unfinished_aborts_uploads_under_its_prefix_only(s3, storage):
    bucket = s3.make_bucket("out")
    client = s3.client()
    for key in ("run/shards/a.tar", "run/0/b.npy", "run-2/c.tar", "other/d.tar"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    place = storage.place("s3://out/run/")
    assert sorted(key for key, _upload in place.uploads_in_progress()) == ["run/0/b.npy", "run/shards/a.tar"]
    assert place.remove_unfinished() == 2
    assert sorted(s3.multipart_uploads(bucket)) == ["other/d.tar", "run-2/c.tar"]
    assert place.remove_unfinished() == 0


def test_s3_delete_goes_in_batches(s3, storage, monkeypatch):
    monkeypatch.setattr(s3_mod, "DELETE_BATCH", 3)
    bucket = s3.make_bucket("out")
    for i in range(8):
        s3.put(bucket, f"run/{i}.json", b"{}")
    s3.put(bucket, "keep.json", b"{}")
    place = storage.place("s3://out/run/")
    assert place.delete([f"{i}.json" for i in range(7)]) == 7
    assert s3.keys(bucket) == {"run/7.json": 2, "keep.json": 2}


def test_s3_place_errors_name_the_object(s3, storage):
    place = storage.place("s3://nobucket/run/")
    with pytest.raises(StorageError, match=r"^s3://nobucket/run/a\.json: cannot read: NoSuchBucket"):
        place.read("a.json")
    with pytest.raises(StorageError, match=r"^s3://nobucket/run/: cannot list: NoSuchBucket"):
        place.list()
    with pytest.raises(StorageError, match=r"^s3://nobucket/run/shards/a\.tar: cannot start upload"):
        place.open_object("shards/a.tar").commit()
    place.close()


def test_a_failed_background_upload_surfaces_on_publish(s3, storage):
    place = storage.place("s3://nobucket/run/")
    place.stage("0/a.npy", b"a")
    with pytest.raises(StorageError, match=r"^s3://nobucket/run/0/a\.npy: cannot write: NoSuchBucket"):
        place.publish(["0/a.npy"])
    place.close()


# ---------------------------------------------------------------------- conditional writes

def test_s3_conditional_writes_are_found_by_a_probe_that_leaves_nothing(s3, storage):
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    assert place.conditional_writes() is True
    assert place.conditional_writes() is True    # probed once
    assert s3.keys(bucket) == {}


def test_s3_create_twice_keeps_the_first_content(s3, storage):
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    assert place.create("manifest/done/a.json", b"first") is True
    assert place.create("manifest/done/a.json", b"second") is False
    assert s3.get(bucket, "run/manifest/done/a.json") == b"first"
    s3.put(bucket, "run/x.json", b"written")                   # an object written plainly: no create over it
    assert place.create("x.json", b"created") is False
    assert s3.get(bucket, "run/x.json") == b"written"


def test_s3_replace_with_the_tag_read_succeeds_and_a_stale_tag_is_refused(s3, storage):
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    assert place.read_tagged("lease") is None
    s3.put(bucket, "run/lease", b"v1")
    first = place.read_tagged("lease")
    assert isinstance(first, Tagged) and first.data == b"v1" and first.tag
    new_tag = place.replace("lease", b"v2", first.tag)
    assert new_tag is not None and new_tag != first.tag
    assert place.read_tagged("lease") == Tagged(b"v2", new_tag)
    assert place.replace("lease", b"mine", first.tag) is None   # stale: another writer came first
    assert s3.get(bucket, "run/lease") == b"v2"
    assert place.replace("lease", b"v3", new_tag) is not None
    assert s3.get(bucket, "run/lease") == b"v3"
    s3.client().delete_object(Bucket=bucket, Key="run/lease")
    assert place.replace("lease", b"mine", new_tag) is None     # gone meanwhile: not recreated
    assert s3.keys(bucket) == {}


def test_s3_replace_without_a_tag_only_creates(s3, storage):
    bucket = s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    tag = place.replace("a/b.json", b"new", None)
    assert tag is not None and place.read_tagged("a/b.json") == Tagged(b"new", tag)
    assert place.replace("a/b.json", b"again", None) is None
    assert s3.get(bucket, "run/a/b.json") == b"new"


def test_s3_conditional_write_failures_that_are_not_conflicts_are_errors(s3, storage):
    place = storage.place("s3://nobucket/run/")
    with pytest.raises(StorageError, match=r"^s3://nobucket/run/a\.json: cannot write: NoSuchBucket"):
        place.create("a.json", b"{}")
    with pytest.raises(StorageError, match=r"^s3://nobucket/run/a\.json: cannot read: NoSuchBucket"):
        place.read_tagged("a.json")


RACERS = 6
ROUNDS = 4


def test_s3_processes_racing_create_on_one_name_one_wins(s3, storage):
    bucket = s3.make_bucket("out")
    names = [f"manifest/done/unit-{r}.json" for r in range(ROUNDS)]
    for name, won in zip(names, race("s3://out/run/", [(name, None) for name in names], RACERS, s3.endpoint)):
        winners = [n for n, created in won.items() if created]
        assert len(won) == RACERS and len(winners) == 1, won
        assert s3.get(bucket, f"run/{name}") == f"writer {winners[0]}".encode() * (winners[0] + 1)


def test_s3_processes_racing_replace_from_one_tag_one_wins(s3, storage):
    s3.make_bucket("out")
    place = storage.place("s3://out/run/")
    rounds = []
    for r in range(ROUNDS):
        name = f"manifest/parts/p-{r}.lease"
        place.write(name, b"the old holder")
        rounds.append((name, place.read_tagged(name).tag))
    for (name, _tag), won in zip(rounds, race("s3://out/run/", rounds, RACERS, s3.endpoint)):
        winners = [n for n, new_tag in won.items() if new_tag is not None]
        assert len(won) == RACERS and len(winners) == 1, won
        winner = winners[0]
        assert place.read_tagged(name) == Tagged(f"writer {winner}".encode() * (winner + 1), won[winner])
