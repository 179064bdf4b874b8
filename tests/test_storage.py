"""storage/: what every backend shares: both backends through the `place` fixture, the errors, redaction,
the clients per process, and the `Storage` entry point."""

import errno
import os
import pickle

import pytest
from botocore.exceptions import ClientError

from wds_encode.storage import (
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


def client_error(code: str, status: int, message: str = "something went wrong") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


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
