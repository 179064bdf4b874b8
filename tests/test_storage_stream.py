"""storage/stream.py: S3 reads that survive dropped connections, on a real S3 protocol (moto, FaultProxy)."""

import re
import threading
import urllib.parse

import pytest

import wds_encode.storage.s3 as s3_mod
import wds_encode.storage.stream as stream_mod
from wds_encode.storage import StorageError

from conftest import MiB, random_bytes
from s3_support import fast_retries, record_requests


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
    monkeypatch.setattr(stream_mod, "READ_ATTEMPTS", 3)
    monkeypatch.setattr(stream_mod, "READ_BACKOFF_SECONDS", 0.001)
    monkeypatch.setattr(s3_mod, "CLIENT_RETRIES", 0)  # each resume is one connection attempt
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
    monkeypatch.setattr(stream_mod, "READ_BUFFER", 64 << 10)  # small reads: some bytes are in when it breaks
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
