"""storage.py: local paths and s3:// behind one interface, against a real S3 protocol (moto, FaultProxy)."""

import errno
import os
import pickle
import random
import re
import threading
import urllib.parse

import pytest
from botocore.exceptions import ClientError

import wds_encode.storage as storage_mod
from wds_encode.storage import (
    PARTIAL,
    PROBE_DIR,
    LocalPlace,
    S3Options,
    S3Place,
    Storage,
    StorageError,
    StorageFull,
    local_error,
    redact,
    redact_url,
    s3_error,
)

from s3_support import fast_retries

MiB = 1 << 20


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def record_requests(proxy, hold_from_get: int = 0) -> tuple[list, threading.Event]:
    """Note (method, path with query, lower-cased headers) of every request the proxy sees from now on; with
    hold_from_get=N, hold that object GET and every request after it (until proxy.release() or stop()).

    Returns the notes and the Event set once a request is held. (A stall predicate: the proxy asks it
    about every request, headers included, until it says hold.)"""
    seen: list[tuple[str, str, dict]] = []

    def note(method: str, target: str, headers: dict) -> bool:
        seen.append((method, target, headers))
        gets = sum(1 for m, t, _h in seen if m == "GET" and "list-type" not in t)
        return bool(hold_from_get) and gets >= hold_from_get
    return seen, proxy.stall(note)


def object_gets(requests) -> list[tuple[str, dict]]:
    """(key path, headers) of the object reads among recorded requests."""
    return [(urllib.parse.urlsplit(target).path, headers) for method, target, headers in requests
            if method == "GET" and "list-type" not in target]


def once_held(held: threading.Event, action) -> threading.Thread:
    """Run action() in a thread as soon as the proxy holds a request (the test's read is blocked on it)."""
    def run():
        if held.wait(30):
            action()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def storage(s3_in_process):
    """A Storage reaching moto directly (endpoint from AWS_ENDPOINT_URL, test credentials from the env)."""
    return Storage()


@pytest.fixture
def proxied(s3_in_process, fault_proxy):
    """A Storage whose S3 requests all go through the fault proxy."""
    return Storage(S3Options(endpoint_url=fault_proxy.endpoint))


def client_error(code: str, status: int, message: str = "something went wrong") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


# ---------------------------------------------------------------------- reading S3 objects

@pytest.mark.parametrize("every", [1, 2])
def test_a_cut_stream_continues_with_a_ranged_get_pinned_to_the_etag(s3, fault_proxy, proxied, every):
    bucket = s3.make_bucket("src")
    objects = {f"data/{i}.tar": random_bytes(3 * MiB + i, seed=i) for i in range(3)}
    for key, data in objects.items():
        s3.put(bucket, key, data)
    etags = {key: s3.client().head_object(Bucket=bucket, Key=key)["ETag"] for key in objects}
    requests, _held = record_requests(fault_proxy)
    fault_proxy.cut_get_every = every

    for key, data in objects.items():
        assert proxied.read_bytes(f"s3://src/{key}") == data

    cuts = fault_proxy.counts["cuts"]
    assert cuts == (3 if every == 1 else 2)  # 1: every first GET of an object; 2: GETs 2 and 4
    assert proxied.counters() == {"retries": 0, "resumes": cuts}
    gets = object_gets(requests)
    assert len(gets) == len(objects) + cuts
    resumed = [(path.removeprefix("/src/"), headers) for path, headers in gets if "if-match" in headers]
    assert len(resumed) == cuts
    for key, headers in resumed:  # continued from where the cut left it (at most the half the proxy sent)
        start = int(re.fullmatch(r"bytes=(\d+)-", headers["range"]).group(1))
        assert 0 < start <= len(objects[key]) // 2
        assert headers["if-match"] == etags[key]
    assert sum("range" in headers for _path, headers in gets) == cuts  # the first GETs were whole


def test_a_stream_that_keeps_breaking_without_progress_ends_in_a_storage_error(s3, fault_proxy, proxied,
                                                                               monkeypatch):
    monkeypatch.setattr(storage_mod, "READ_ATTEMPTS", 3)
    monkeypatch.setattr(storage_mod, "READ_BACKOFF_SECONDS", 0.001)
    monkeypatch.setattr(storage_mod, "CLIENT_RETRIES", 0)  # each resume is one connection attempt
    bucket = s3.make_bucket("src")
    data = random_bytes(3 * MiB)
    s3.put(bucket, "big.tar", data)
    fault_proxy.cut_get_every = 1
    _requests, held = record_requests(fault_proxy, hold_from_get=2)
    stopper = once_held(held, fault_proxy.stop)  # the first resume hangs up unanswered, the next find no one

    with pytest.raises(StorageError) as failed:
        proxied.read_bytes("s3://src/big.tar")
    stopper.join()
    message = str(failed.value)
    assert message.startswith("s3://src/big.tar: the connection broke 3 times at byte ")
    assert "without progress; last: " in message
    reached = int(re.search(r"at byte (\d+)", message).group(1))
    assert 0 < reached <= len(data) // 2
    assert failed.value.place == "s3://src/big.tar"
    assert proxied.resumes == 2  # the third failure gives up instead


def test_an_object_deleted_mid_read_is_a_storage_error_not_a_short_read(s3, fault_proxy, proxied,
                                                                        monkeypatch):
    fast_retries(monkeypatch)
    bucket = s3.make_bucket("src")
    s3.put(bucket, "gone.tar", random_bytes(3 * MiB))
    fault_proxy.cut_get_every = 1
    _requests, held = record_requests(fault_proxy, hold_from_get=2)

    def delete():
        s3.client().delete_object(Bucket=bucket, Key="gone.tar")
        fault_proxy.release()  # the held resume is hung up on; botocore's retry of it finds no object
    deleter = once_held(held, delete)
    with pytest.raises(StorageError) as failed:
        proxied.read_bytes("s3://src/gone.tar")
    deleter.join()
    assert str(failed.value).startswith("s3://src/gone.tar: cannot read: NoSuchKey")


def test_an_object_replaced_mid_read_is_an_error_never_a_splice(s3, fault_proxy, proxied, monkeypatch):
    fast_retries(monkeypatch)
    monkeypatch.setattr(storage_mod, "READ_BUFFER", 64 << 10)  # small reads: some bytes are in when it breaks
    bucket = s3.make_bucket("src")
    old, new = random_bytes(3 * MiB, seed=1), random_bytes(3 * MiB, seed=2)
    s3.put(bucket, "shard.tar", old)
    old_etag = s3.client().head_object(Bucket=bucket, Key="shard.tar")["ETag"]
    fault_proxy.cut_get_every = 1  # the first GET breaks half-way
    _requests, held = record_requests(fault_proxy, hold_from_get=2)

    def replace():
        s3.put(bucket, "shard.tar", new)  # straight to moto, not through the proxy
        fault_proxy.release()  # the held resume is hung up on; botocore's retry of it reaches moto
    replacer = once_held(held, replace)

    received = bytearray()
    with proxied.open_read("s3://src/shard.tar") as f:
        with pytest.raises(StorageError, match="changed while it was being read") as failed:
            while chunk := f.read(64 << 10):
                received += chunk
    replacer.join()
    assert str(failed.value).startswith(f"s3://src/shard.tar: the object changed while it was being read "
                                        f"(ETag {old_etag})")
    assert 0 < len(received) < len(old)
    assert bytes(received) == old[:len(received)]  # only the old version's bytes, never the new one's
    assert proxied.resumes == 1


def test_read_bytes_of_an_empty_object_and_of_a_missing_one(s3, storage):
    bucket = s3.make_bucket("src")
    s3.put(bucket, "empty.tar", b"")
    assert storage.read_bytes("s3://src/empty.tar") == b""
    with pytest.raises(StorageError, match=r"^s3://src/missing.tar: cannot read: NoSuchKey"):
        storage.read_bytes("s3://src/missing.tar")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.read_bytes("s3://nobucket/a.tar")


def test_local_files_are_read_through_the_same_call(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"local bytes")
    storage = Storage()
    assert storage.read_bytes(str(path)) == b"local bytes"
    with pytest.raises(StorageError) as failed:
        storage.open_read(str(tmp_path / "missing.tar"))
    assert str(failed.value) == f"{tmp_path / 'missing.tar'}: cannot read: No such file or directory"


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

def test_a_place_writes_reads_lists_and_deletes(place):
    place.write("details.json", b"one")
    place.write("details.json", b"two")  # replaced whole
    place.write("manifest/ds__a.json", b"{}")
    place.write("shards/ds/a-000.tar", b"x" * 10)
    assert place.read("details.json") == b"two"
    assert place.read("missing.json") is None
    assert place.list() == {"details.json": 3, "manifest/ds__a.json": 2, "shards/ds/a-000.tar": 10}
    assert place.list("shards") == place.list("shards/") == {"shards/ds/a-000.tar": 10}
    assert place.list("nothing/") == {}
    assert place.read_many(["details.json", "missing.json", "manifest/ds__a.json"]) == {
        "details.json": b"two", "missing.json": None, "manifest/ds__a.json": b"{}"}
    assert place.delete(["details.json", "manifest/ds__a.json"]) >= 2
    assert place.list() == {"shards/ds/a-000.tar": 10}
    place.close()


def test_staged_files_appear_on_publish_and_go_on_unstage(place):
    place.stage("0/a.npy", b"a")
    place.stage("0/b.npy", b"bb")
    place.publish(["0/a.npy"])
    place.unstage(["0/b.npy"])
    place.close()
    assert place.list() == {"0/a.npy": 1}
    assert place.read("0/a.npy") == b"a"


def test_a_streamed_object_appears_only_on_commit(place):
    writer = place.open_object("shards/ds/a.tar")
    for i in range(10):
        writer.write(bytes([i]) * 1000)
    writer.finish()
    assert not [rel for rel in place.list() if rel.endswith(".tar")]
    writer.commit()
    assert place.read("shards/ds/a.tar") == b"".join(bytes([i]) * 1000 for i in range(10))
    dropped = place.open_object("shards/ds/b.tar")
    dropped.write(b"never")
    dropped.abort()
    assert place.list() == {"shards/ds/a.tar": 10_000}
    assert place.remove_unfinished() == 0
    place.close()


def test_local_write_is_atomic_and_leaves_no_partial_file(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    place.write("a/b/c.json", b"first")
    place.write("a/b/c.json", b"second")
    assert (tmp_path / "out" / "a" / "b" / "c.json").read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "out" / "a" / "b").iterdir()) == ["c.json"]
    assert place.delete(["a/b/c.json", "a/b/never.json"]) == 1
    assert place.list() == {}


def test_local_remove_unfinished_deletes_partial_files_only(tmp_path):
    place = LocalPlace(str(tmp_path))
    place.stage("0/a.npy", b"a")
    place.write("0/b.npy", b"b")
    writer = place.open_object("shards/x.tar")
    writer.write(b"half")
    writer.finish()  # an interrupted run: never committed nor aborted
    assert sorted(place.list()) == ["0/a.npy" + PARTIAL, "0/b.npy", "shards/x.tar" + PARTIAL]
    assert place.remove_unfinished() == 2
    assert place.list() == {"0/b.npy": 1}


def test_local_errors_are_storage_errors(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    place = LocalPlace(str(tmp_path / "file.txt" / "out"))
    with pytest.raises(StorageError, match=r"file\.txt/out/.*cannot write"):
        place.write("a.json", b"{}")
    with pytest.raises(StorageError, match="Not a directory"):
        place.open_object("a.tar")
    with pytest.raises(StorageError, match=r"a\.json: cannot read: Not a directory"):
        place.read("a.json")  # not "missing": something is in the way
    assert place.list() == {}


def test_check_writable_local_folder_leaves_nothing_behind(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    place.check_writable()
    assert (tmp_path / "out").is_dir()  # the output folder itself is made
    assert place.list() == {}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == []  # not even an empty probe folder


def test_check_writable_local_path_under_a_file_fails(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(StorageError) as failed:
        LocalPlace(str(tmp_path / "file.txt" / "out")).check_writable()
    assert str(failed.value).startswith(str(tmp_path / "file.txt" / "out" / PROBE_DIR))
    assert "Not a directory" in str(failed.value)


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
    monkeypatch.setattr(storage_mod, "PART_SIZE", 5 * MiB)  # S3's minimum part size
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
    monkeypatch.setattr(storage_mod, "PART_SIZE", 5 * MiB)
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
    monkeypatch.setattr(storage_mod, "DELETE_BATCH", 3)
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


# ---------------------------------------------------------------------- errors

@pytest.mark.parametrize("code,status", [("XMinioStorageFull", 507), ("SomethingNew", 507),
                                         ("QuotaExceeded", 403), ("XMinioAdminBucketQuotaExceeded", 400),
                                         ("EntityTooLarge", 400)])
def test_no_room_left_on_s3_is_storage_full(code, status):
    error = s3_error("s3://out/run/a.tar", client_error(code, status, "no room"), "cannot write")
    assert isinstance(error, StorageFull)
    assert str(error) == f"s3://out/run/a.tar: cannot write: {code}: no room"


@pytest.mark.parametrize("code,status", [("AccessDenied", 403), ("SlowDown", 503), ("InternalError", 500)])
def test_other_s3_errors_are_plain_storage_errors(code, status):
    error = s3_error("s3://out/a", client_error(code, status))
    assert type(error) is StorageError
    assert error.reason == f"{code}: something went wrong"


def test_s3_error_does_not_repeat_a_code_the_message_holds_and_handles_any_exception():
    error = s3_error("s3://b/k", client_error("404", 404, "Not Found"), "cannot read")
    assert error.reason == "cannot read: 404: Not Found"
    error = s3_error("s3://b/k", client_error("NoSuchKey", 404, "NoSuchKey: the key does not exist"))
    assert error.reason == "NoSuchKey: the key does not exist"
    error = s3_error("s3://b/k", ConnectionResetError("reset by peer"), "cannot read")
    assert type(error) is StorageError and error.reason == "cannot read: ConnectionResetError: reset by peer"


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG],
                         ids=["ENOSPC", "EDQUOT", "EFBIG"])
def test_a_full_disk_is_storage_full(number):
    error = local_error("/out/a.npy", OSError(number, os.strerror(number)), "cannot write")
    assert isinstance(error, StorageFull)
    assert str(error) == f"/out/a.npy: cannot write: {os.strerror(number)}"


def test_other_local_errors_are_plain_storage_errors():
    error = local_error("/out/a.npy", PermissionError(errno.EACCES, "Permission denied"))
    assert type(error) is StorageError and error.reason == "Permission denied"


def test_storage_errors_never_show_credentials_in_urls():
    error = StorageError("http://user:pw@host:9000/b/k", "cannot reach http://user:pw@host:9000: refused")
    assert "pw" not in str(error) and "user" not in str(error)
    assert error.place == "http://***@host:9000/b/k"
    assert error.reason == "cannot reach http://***@host:9000: refused"


# ---------------------------------------------------------------------- redaction

def test_redact_url_strips_user_info_only():
    assert redact_url("http://user:pw@host:9000/x") == "http://***@host:9000/x"
    assert redact_url("https://token@host/x") == "https://***@host/x"
    text = "see http://a:b@h1/ and s3+http://c:d@h2/"
    assert redact_url(text) == "see http://***@h1/ and s3+http://***@h2/"
    for plain in ("http://host:9000/x", "s3://bucket/a@2x.tar", "/local/a@b.tar", "user@host"):
        assert redact_url(plain) == plain


def test_redact_masks_secret_fields_and_keeps_the_rest():
    config = {
        "aws_secret_access_key": "s3cr3t", "aws_session_token": "tok", "password": "pw",
        "aws_access_key_id": "AKIA", "credentials": "c", "api-token": "t",
        "num_tokens": 5, "token_dim": 64, "max_tokens": "100", "sample_size": 1024, "secret": "",
        "endpoint_url": "http://user:pw@host:9000/", "name": "run",
        "datasets": [{"path": "s3://b/p", "s3": {"endpoint_url": "https://k:s@e/", "password": "x"}},
                     ("http://u:p@h/", 3)],
        "s3": {"profile": "prod", "secret_key": None},
        "SecretAccessKey": "k", "SessionToken": "t", "api_key": "a", "MaxTokens": "7",
    }
    assert redact(config) == {
        "aws_secret_access_key": "***", "aws_session_token": "***", "password": "***",
        "aws_access_key_id": "***", "credentials": "***", "api-token": "***",
        "num_tokens": 5, "token_dim": 64, "max_tokens": "100", "sample_size": 1024, "secret": "",
        "endpoint_url": "http://***@host:9000/", "name": "run",
        "datasets": [{"path": "s3://b/p", "s3": {"endpoint_url": "https://***@e/", "password": "***"}},
                     ["http://***@h/", 3]],
        "s3": {"profile": "prod", "secret_key": None},
        "SecretAccessKey": "***", "SessionToken": "***", "api_key": "***", "MaxTokens": "7",
    }


def test_storage_errors_cross_process_boundaries():
    import pickle
    error = pickle.loads(pickle.dumps(StorageFull("s3://b/k", "cannot write: XMinioStorageFull: full", "XMinioStorageFull")))
    assert type(error) is StorageFull and error.code == "XMinioStorageFull" and str(error).startswith("s3://b/k: ")


# ---------------------------------------------------------------------- clients per process

def test_storage_pickles_without_its_clients(s3, storage):
    bucket = s3.make_bucket("src")
    s3.put(bucket, "a.tar", b"abc")
    assert storage.read_bytes("s3://src/a.tar") == b"abc"  # a client exists now
    storage.retries = 3
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.defaults == storage.defaults
    assert copy._clients == {} and copy.counters() == {"retries": 0, "resumes": 0}
    assert copy.read_bytes("s3://src/a.tar") == b"abc"
    assert copy.client() is not storage.client()


def test_clients_are_per_process_and_per_options(s3, storage, monkeypatch):
    first = storage.client()
    assert storage.client() is first
    assert storage.client(S3Options(region="eu-west-3")) is not first
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as a forked DataLoader worker sees it
    assert storage.client() is not first


def test_options_fill_unset_fields_from_defaults():
    defaults = S3Options(profile="p", endpoint_url="http://e:1", region="r")
    assert S3Options().over(defaults) == defaults
    assert S3Options(region="x").over(defaults) == S3Options(profile="p", endpoint_url="http://e:1",
                                                             region="x")


def test_place_url_and_kind():
    storage = Storage()
    place = storage.place("s3://out/run")
    assert isinstance(place, S3Place) and place.url == "s3://out/run/" and place.key("/a/b") == "run/a/b"
    assert place.child("a/b.json") == "s3://out/run/a/b.json"
    assert storage.place("s3://out").url == "s3://out/" and storage.place("s3://out").key("x") == "x"
    assert isinstance(storage.place("/tmp/x"), LocalPlace)
    with pytest.raises(ValueError):
        storage.place("s3:///run/")
