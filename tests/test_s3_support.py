"""The S3 test infrastructure itself: moto through the real protocol, FaultProxy's faults as boto3 sees them.

Other modules trust these tools to tell a product bug from a harness bug, so the harness is tested first.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError

from s3_support import (
    NO_RETRIES,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    FaultProxy,
    fault_proxy,
    moto_s3,
    s3,
    fast_retries,
    s3_env,
)

FIXTURES = (moto_s3, s3, fault_proxy)  # imported for pytest to find, not called

MiB = 1 << 20

# what reading a body cut mid-way may raise, depending on where the reset lands
STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, ProtocolError, ConnectionError)


def payload(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset, so a misplaced or missing range shows up."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


def test_moto_server_basics(s3):
    assert s3.endpoint.startswith("http://127.0.0.1:")
    bucket = s3.make_bucket("basics")
    s3.put(bucket, "a/one", b"1")
    s3.put(bucket, "a/two", b"22")
    s3.put(bucket, "b/three", b"333")
    assert s3.keys(bucket) == {"a/one": 1, "a/two": 2, "b/three": 3}
    assert s3.keys(bucket, "a/") == {"a/one": 1, "a/two": 2}
    assert s3.get(bucket, "b/three") == b"333"

    upload = s3.client().create_multipart_upload(Bucket=bucket, Key="a/big")
    assert s3.multipart_uploads(bucket) == ["a/big"]
    assert s3.multipart_uploads(bucket, "b/") == []
    s3.client().abort_multipart_upload(Bucket=bucket, Key="a/big", UploadId=upload["UploadId"])
    assert s3.multipart_uploads(bucket) == []

    s3.reset()
    assert s3.client().list_buckets()["Buckets"] == []


def test_listings_read_every_page(s3, monkeypatch):
    monkeypatch.setattr(s3, "page_size", 2)
    bucket = s3.make_bucket("pages")
    client = s3.client()
    for i in range(5):
        s3.put(bucket, f"k/{i}", b"x" * i)
        client.create_multipart_upload(Bucket=bucket, Key=f"u/{i}")
    s3.put(bucket, "other", b"")
    assert s3.keys(bucket, "k/") == {f"k/{i}": i for i in range(5)}
    assert len(s3.keys(bucket)) == 6
    assert sorted(s3.multipart_uploads(bucket)) == [f"u/{i}" for i in range(5)]


def test_s3_fixture_starts_empty(s3):
    assert s3.client().list_buckets()["Buckets"] == []
    s3.make_bucket("left-behind")  # the next test must not see it


def test_s3_fixture_starts_empty_again(s3):
    test_s3_fixture_starts_empty(s3)


def test_s3_env_isolates_a_subprocess(s3, fault_proxy, monkeypatch, tmp_path):
    """A subprocess given s3_env reaches the endpoint with the test credentials, whatever the shell had."""
    (tmp_path / "config").write_text("[default]\nregion = eu-west-3\nendpoint_url = http://192.0.2.1:9\n")
    monkeypatch.setenv("AWS_PROFILE", "someone-elses")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "not-for-tests")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://192.0.2.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("HTTPS_PROXY", "http://192.0.2.1:9")
    monkeypatch.setenv("http_proxy", "http://192.0.2.1:9")

    env = s3_env(fault_proxy.endpoint, WDS_EXTRA="yes")
    assert env["AWS_ACCESS_KEY_ID"] == TEST_ACCESS_KEY_ID
    assert env["AWS_SECRET_ACCESS_KEY"] == TEST_SECRET_ACCESS_KEY
    assert env["AWS_DEFAULT_REGION"] == env["AWS_REGION"] == TEST_REGION
    assert env["AWS_ENDPOINT_URL"] == fault_proxy.endpoint
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert "127.0.0.1" in env["NO_PROXY"] and "127.0.0.1" in env["no_proxy"]
    assert env["WDS_EXTRA"] == "yes" and env["PATH"] == os.environ["PATH"]
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "HTTPS_PROXY", "http_proxy"):
        assert name not in env
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        assert name not in env or os.path.getsize(env[name]) == 0

    bucket = s3.make_bucket("from-subprocess")
    script = ("import boto3; c = boto3.client('s3'); "
              f"c.put_object(Bucket='{bucket}', Key='k', Body=b'sub'); print(c.meta.region_name)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == TEST_REGION
    assert s3.get(bucket, "k") == b"sub"
    assert fault_proxy.counts["requests"] == 1  # it went through the endpoint given, nowhere else


def test_proxy_without_faults_is_transparent(s3, fault_proxy):
    direct, proxied = s3.client(), s3.client(fault_proxy.endpoint)
    bucket = "transparent"
    proxied.create_bucket(Bucket=bucket)
    small, large = payload(1000), payload(3 * MiB + 17, seed=5)
    proxied.put_object(Bucket=bucket, Key="small", Body=small)
    proxied.put_object(Bucket=bucket, Key="dir/large", Body=io.BytesIO(large))  # with Expect: 100-continue
    direct.put_object(Bucket=bucket, Key="dir/direct", Body=b"")

    for key, data in (("small", small), ("dir/large", large), ("dir/direct", b"")):
        assert proxied.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert proxied.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(data)
    ranged = proxied.get_object(Bucket=bucket, Key="dir/large", Range="bytes=100-199")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206 and ranged["Body"].read() == large[100:200]

    pages = proxied.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 1})
    listed = {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
    assert listed == s3.keys(bucket) == {"small": 1000, "dir/large": len(large), "dir/direct": 0}
    with pytest.raises(ClientError) as missing:
        proxied.get_object(Bucket=bucket, Key="nope")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    proxied.delete_object(Bucket=bucket, Key="small")
    assert "small" not in s3.keys(bucket)
    assert fault_proxy.counts["requests"] > 10
    assert fault_proxy.counts == {"requests": fault_proxy.counts["requests"], "cuts": 0, "errors_503": 0,
                                  "held": 0, "rejected": 0}


def test_cut_get_resets_mid_body(s3, fault_proxy):
    bucket = s3.make_bucket("cuts")
    data = payload(200_000)
    s3.put(bucket, "obj", data)
    fault_proxy.cut_get_every = 1
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES)

    response = client.get_object(Bucket=bucket, Key="obj")  # the head comes through whole
    assert response["ContentLength"] == len(data)
    with pytest.raises(STREAM_ERRORS):
        response["Body"].read()
    assert fault_proxy.counts["cuts"] == 1

    # never two cuts in a row: the resume is served, as a 206
    resumed = client.get_object(Bucket=bucket, Key="obj", Range="bytes=150000-")
    assert resumed["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert resumed["Body"].read() == data[150_000:]
    assert fault_proxy.counts["cuts"] == 1

    # listings, heads, puts and empty reads are not object reads with a body: never cut
    client.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert client.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    assert client.head_object(Bucket=bucket, Key="obj")["ContentLength"] == len(data)
    assert {obj["Key"] for obj in client.list_objects_v2(Bucket=bucket)["Contents"]} == {"obj", "empty"}
    assert fault_proxy.counts["cuts"] == 1

    with pytest.raises(STREAM_ERRORS):  # the next object read is cut again
        client.get_object(Bucket=bucket, Key="obj")["Body"].read()
    assert fault_proxy.counts["cuts"] == 2


def test_cut_schedule_is_deterministic(s3, fault_proxy):
    bucket = s3.make_bucket("schedule")
    s3.put(bucket, "obj", payload(10_000))
    fault_proxy.cut_get_every = 3
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES)
    outcomes = []
    for _ in range(7):
        try:
            client.get_object(Bucket=bucket, Key="obj")["Body"].read()
            outcomes.append("ok")
        except STREAM_ERRORS:
            outcomes.append("cut")
    assert outcomes == ["ok", "ok", "cut", "ok", "ok", "cut", "ok"]


def test_503_retried_by_default_client(s3, fault_proxy, monkeypatch):
    bucket = s3.make_bucket("slowdown")
    fault_proxy.fail_503_every = 2
    fast_retries(monkeypatch)
    client = s3.client(fault_proxy.endpoint)
    for i in range(10):
        data = payload(1000 + i, seed=i)
        client.put_object(Bucket=bucket, Key=f"k{i}", Body=data)
        assert client.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == data
    assert fault_proxy.counts["errors_503"] >= 5
    assert s3.keys(bucket) == {f"k{i}": 1000 + i for i in range(10)}


def test_503_without_retries_is_slow_down(s3, fault_proxy):
    bucket = s3.make_bucket("slowdown")
    s3.put(bucket, "obj", b"data")
    fault_proxy.fail_503_every = 2
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES)

    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"data"  # request 1
    with pytest.raises(ClientError) as got:  # request 2
        client.get_object(Bucket=bucket, Key="obj")
    assert got.value.response["Error"]["Code"] == "SlowDown"
    assert got.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503

    client.head_object(Bucket=bucket, Key="obj")  # request 3
    with pytest.raises(ClientError) as got:  # request 4: PUT with Expect: 100-continue, refused before body
        client.put_object(Bucket=bucket, Key="refused", Body=io.BytesIO(payload(100_000)))
    assert got.value.response["Error"]["Code"] == "SlowDown"
    client.put_object(Bucket=bucket, Key="accepted", Body=b"x")  # request 5
    with pytest.raises(ClientError) as got:  # request 6: HEAD, answered without a body
        client.head_object(Bucket=bucket, Key="obj")
    assert got.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert fault_proxy.counts["errors_503"] == 3
    assert s3.keys(bucket) == {"obj": 4, "accepted": 1}


def request_outcomes(request, times: int) -> list[str]:
    """`request()` called `times` times: "ok", "503" (an S3 error answer) or "cut" (a broken stream) each."""
    outcomes = []
    for _ in range(times):
        try:
            request()
            outcomes.append("ok")
        except ClientError:
            outcomes.append("503")
        except STREAM_ERRORS:
            outcomes.append("cut")
    return outcomes


def test_503_at_most_a_number_of_times(s3, fault_proxy):
    bucket = s3.make_bucket("slowdown")
    s3.put(bucket, "obj", b"data")
    fault_proxy.fail_503_every = 2
    fault_proxy.fail_503_at_most = 2
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES)
    outcomes = request_outcomes(lambda: client.head_object(Bucket=bucket, Key="obj"), 8)
    assert outcomes == ["ok", "503", "ok", "503", "ok", "ok", "ok", "ok"]
    assert fault_proxy.counts["errors_503"] == 2


def test_faults_never_repeat_back_to_back(s3, fault_proxy):
    """Every-1 schedules still alternate, so one retry always gets through."""
    bucket = s3.make_bucket("alternate")
    s3.put(bucket, "obj", payload(5000))
    fault_proxy.fail_503_every = 1
    fault_proxy.cut_get_every = 1
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES)
    outcomes = request_outcomes(lambda: client.get_object(Bucket=bucket, Key="obj")["Body"].read(), 8)
    # requests 1, 3, 5, 7 are 503s; of the forwarded reads 2, 4, 6, 8, every other one is cut
    assert outcomes == ["503", "cut", "503", "ok", "503", "cut", "503", "ok"]
    assert fault_proxy.counts == {"requests": 8, "cuts": 2, "errors_503": 4, "held": 0, "rejected": 0}


def test_stall_holds_until_release(s3, fault_proxy):
    bucket = s3.make_bucket("stall")
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES, read_timeout=20, connect_timeout=5)
    client.put_object(Bucket=bucket, Key="before", Body=b"1")
    held = fault_proxy.stall(lambda method, path, headers: method == "PUT" and path.endswith("/held")
                             and headers.get("content-length") == "5")
    client.put_object(Bucket=bucket, Key="not-matching", Body=b"2")  # before the first match: forwarded

    errors: dict[str, BaseException] = {}

    def call(name, fn, **kwargs):
        try:
            fn(Bucket=bucket, **kwargs)
        except Exception as exc:  # checked by the test thread
            errors[name] = exc

    put = threading.Thread(target=call, args=("put", client.put_object),
                           kwargs={"Key": "held", "Body": b"12345"})
    put.start()
    assert held.wait(10), "the matching PUT never reached the proxy"
    time.sleep(0.2)
    assert put.is_alive()  # held: no answer
    after = threading.Thread(target=call, args=("get", client.get_object), kwargs={"Key": "before"})
    after.start()
    deadline = time.monotonic() + 10
    while fault_proxy.counts["held"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fault_proxy.counts["held"] == 2 and after.is_alive()  # every request after the match is held too

    released_at = time.monotonic()
    fault_proxy.release()
    put.join(10)
    after.join(10)
    assert not put.is_alive() and not after.is_alive()
    assert time.monotonic() - released_at < 5  # ended by release(), not by the read timeout
    assert set(errors) == {"put", "get"}
    for exc in errors.values():  # "Connection was closed before we received a valid response"
        assert isinstance(exc, ConnectionClosedError), repr(exc)

    assert s3.keys(bucket) == {"before": 1, "not-matching": 1}  # the held PUT was never forwarded
    client.put_object(Bucket=bucket, Key="held", Body=b"12345")  # stalling stopped
    assert s3.get(bucket, "held") == b"12345"


def test_multipart_upload_through_proxy(s3, fault_proxy):
    bucket = s3.make_bucket("multipart")
    client = s3.client(fault_proxy.endpoint)
    data = payload(12 * MiB, seed=3)
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * MiB), 1):
        body = io.BytesIO(data[start:start + 5 * MiB])
        done = client.upload_part(Bucket=bucket, Key="big", UploadId=upload_id, PartNumber=number, Body=body)
        parts.append({"PartNumber": number, "ETag": done["ETag"]})
    assert len(parts) == 3
    assert s3.multipart_uploads(bucket) == ["big"]
    listed = client.list_parts(Bucket=bucket, Key="big", UploadId=upload_id)["Parts"]
    assert [p["Size"] for p in listed] == [5 * MiB, 5 * MiB, 2 * MiB]
    client.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    assert s3.multipart_uploads(bucket) == []
    assert s3.keys(bucket) == {"big": len(data)}
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == data


def test_proxy_survives_broken_clients(s3, fault_proxy):
    port = int(fault_proxy.endpoint.rsplit(":", 1)[1])
    for junk in (b"GET /x HTTP/1.1\r\nHost: a\r\n", b"not http at all\r\n\r\n",
                 b"PUT /b/k HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(junk)
    bucket = s3.make_bucket("survivor")
    client = s3.client(fault_proxy.endpoint)
    client.put_object(Bucket=bucket, Key="k", Body=b"fine")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"fine"


def test_proxy_stops_promptly(s3):
    proxy = FaultProxy(s3.endpoint).start()
    proxy.stall(lambda *_: True)
    port = int(proxy.endpoint.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /a/b HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    deadline = started + 5
    while proxy.counts["held"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.stop()
    assert time.monotonic() - started < 3
    assert sock.recv(100) == b""  # closed without an answer
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_proxy_passes_a_chunked_request_body(s3, fault_proxy):
    bucket = s3.make_bucket("chunked")
    conn = http.client.HTTPConnection(*_host_port(fault_proxy.endpoint), timeout=10)
    conn.request("PUT", f"/{bucket}/key", body=iter([b"abc", b"defg"]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    assert s3.get(bucket, "key") == b"abcdefg"


class _FakeUpstream:
    """An HTTP server that answers GET /<framing> with a body framed that way, as moto never does."""

    BODY = b"0123456789" * 1000
    RESPONSES = {
        "/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"1f40\r\n" + BODY[:8000] + b"\r\n7d0;ext=1\r\n" + BODY[8000:] + b"\r\n"
                     b"0\r\nX-Trailer: t\r\n\r\n"),
        "/to-eof": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + BODY,
        "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + BODY,
        "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
    }

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # a blocked accept() would outlive close()
        self.closed = threading.Event()
        self.endpoint = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(10)
            with conn, conn.makefile("rb") as reader:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += reader.readline()
                self.requests.append(head)
                conn.sendall(self.RESPONSES[head.split(b" ")[1].decode()])

    def close(self):
        self.closed.set()
        self.thread.join(5)
        self.listener.close()


def test_proxy_relays_every_response_framing():
    upstream = _FakeUpstream()
    proxy = FaultProxy(upstream.endpoint).start()
    try:
        for path in ("/chunked", "/to-eof", "/interim"):
            conn = http.client.HTTPConnection(*_host_port(proxy.endpoint), timeout=10)
            conn.request("GET", path, headers={"Connection": "keep-alive", "Expect": "100-continue"})
            response = conn.getresponse()
            assert (path, response.status, response.read()) == (path, 200, _FakeUpstream.BODY)
            assert response.getheader("Connection") == "close"
            conn.close()
        conn = http.client.HTTPConnection(*_host_port(proxy.endpoint), timeout=10)
        conn.request("GET", "/no-content")
        assert conn.getresponse().status == 204
        conn.close()
        for head in upstream.requests:  # hop-by-hop headers replaced, Expect answered by the proxy
            assert b"\r\nConnection: close\r\n" in head
            assert b"keep-alive" not in head and b"Expect" not in head
    finally:
        proxy.stop()
        upstream.close()


def _host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("http://").split(":")
    return host, int(port)


def test_reject_answers_an_s3_error_of_the_proxys_own(s3, fault_proxy):
    import botocore.exceptions
    s3.make_bucket("bkt")
    client = s3.client(fault_proxy.endpoint, retries=NO_RETRIES)
    fault_proxy.reject(lambda method, path, headers: method == "PUT" and "/denied/" in path)
    client.put_object(Bucket="bkt", Key="ok/x", Body=b"1")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.put_object(Bucket="bkt", Key="denied/x", Body=b"1")
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    fault_proxy.reject(lambda method, path, headers: True, status=507, code="XMinioStorageFull")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.get_object(Bucket="bkt", Key="ok/x")
    assert info.value.response["Error"]["Code"] == "XMinioStorageFull"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 507
    fault_proxy.reject(None)
    assert client.get_object(Bucket="bkt", Key="ok/x")["Body"].read() == b"1"
    assert fault_proxy.counts["rejected"] == 2 and s3.keys("bkt") == {"ok/x": 1}
