"""S3 test infrastructure: a real S3-protocol server (moto) on 127.0.0.1, and a TCP proxy that injects faults.

Tests talk to S3 through the real protocol, so what they check is what a user's bucket would see:
boto3 in the test process or the `wds-encode` subprocess, sockets, HTTP/1.1, moto behind it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable

import pytest

TEST_ACCESS_KEY_ID = "AKIAWDSENCODETEST7Q3Z"  # distinctive, so tests can grep outputs for leaked credentials
TEST_SECRET_ACCESS_KEY = "wdsEncodeTestSecret+9f8e7d6c5b4a3/Zx"
TEST_REGION = "us-east-1"

# botocore Config(retries=NO_RETRIES): a single attempt.
# Not {"max_attempts": 1}: botocore reads that as one *retry*, two attempts.
NO_RETRIES = {"total_max_attempts": 1, "mode": "standard"}

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    """os.environ plus what a subprocess needs to reach `endpoint` with the test credentials, nothing else.

    Every AWS_* variable of the developer is dropped and the config/credentials files point at an empty
    file, so a profile, a session token or an AWS_ENDPOINT_URL_S3 from ~/.aws or the shell never leaks in.
    Proxies are removed and 127.0.0.1 bypasses any that remain. `extra` is applied last.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in _PROXY_VARS}
    env.update(
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION=TEST_REGION,
        AWS_REGION=TEST_REGION,
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


_session = None
_session_lock = threading.Lock()  # botocore sessions are not thread-safe; clients are


def _new_client(**kwargs):
    """An S3 client from one shared session blind to the developer's AWS_* variables and ~/.aws files.

    Shared, because loading the S3 model costs a fresh session a few hundred milliseconds.
    """
    global _session
    import boto3
    import botocore.session
    from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES  # sic, botocore's spelling

    with _session_lock:
        if _session is None:
            session_vars = {name: (config_name, None, default, convert)  # None: read no environment variable
                            for name, (config_name, _env, default, convert)
                            in BOTOCORE_DEFAUT_SESSION_VARIABLES.items()}
            session_vars["config_file"] = (None, None, os.devnull, None)
            session_vars["credentials_file"] = (None, None, os.devnull, None)
            core = botocore.session.Session(session_vars=session_vars)
            _session = boto3.session.Session(botocore_session=core)
        return _session.client("s3", **kwargs)


def _missing_uploads_answered_as_s3_does() -> None:
    """moto answers a part or a completion of an upload that was aborted (a take-over's clean-up aborts a
    paused holder's) with 500 (a KeyError in its backend), which botocore retries ten times, half a minute
    of backoff; S3 answers 404 NoSuchUpload at once. Make moto's backend do what S3 does (once per process)."""
    from moto.s3 import models
    from moto.s3.exceptions import NoSuchUpload

    backend = models.S3Backend
    if getattr(backend, "_wds_encode_no_such_upload", False):
        return

    def checked(method):
        def call(self, bucket_name, multipart_id, *args, **kwargs):
            if multipart_id not in self.get_bucket(bucket_name).multiparts:
                raise NoSuchUpload(upload_id=multipart_id)
            return method(self, bucket_name, multipart_id, *args, **kwargs)
        return call

    backend.upload_part = checked(backend.upload_part)
    backend.complete_multipart_upload = checked(backend.complete_multipart_upload)
    backend._wds_encode_no_such_upload = True


class MotoS3:
    """moto's ThreadedMotoServer on 127.0.0.1 (free port), started and stopped by the tests."""

    page_size = 1000  # keys() and multipart_uploads() list this many per request; pagination tests lower it

    def __init__(self) -> None:
        self._server = None
        self._direct = None
        self.endpoint = ""

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        _missing_uploads_answered_as_s3_does()
        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:  # one log line per request would drown real failures
            werkzeug_log.setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._direct = self.client()  # for the helpers below
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        wsgi_server = getattr(self._server, "_server", None)  # stop() leaves the listening socket open
        if wsgi_server is not None:
            wsgi_server.server_close()
        self._server = None
        self._direct = None

    def client(self, endpoint: str | None = None, **config):
        """A boto3 S3 client with the test credentials, path-style addressing, no proxies.

        `config` is passed to botocore's Config, e.g. retries=NO_RETRIES, read_timeout=2 (dicts are copied:
        botocore rewrites a retries dict in place).
        """
        from botocore.config import Config

        config = {name: dict(value) if isinstance(value, dict) else value for name, value in config.items()}
        s3_config = {"addressing_style": "path", **config.pop("s3", {})}
        config.setdefault("proxies", {})  # {} and not None: never use HTTP(S)_PROXY for 127.0.0.1
        return _new_client(
            endpoint_url=endpoint or self.endpoint,
            region_name=TEST_REGION,
            aws_access_key_id=TEST_ACCESS_KEY_ID,
            aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
            config=Config(s3=s3_config, **config),
        )

    def make_bucket(self, name: str) -> str:
        self._direct.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under `prefix` (all pages) -> its size."""
        found: dict[str, int] = {}
        pages = self._direct.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size})
        for page in pages:
            for obj in page.get("Contents", []):
                found[obj["Key"]] = obj["Size"]
        return found

    def get(self, bucket: str, key: str) -> bytes:
        return self._direct.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._direct.put_object(Bucket=bucket, Key=key, Body=data)

    def multipart_uploads(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys with a multipart upload in progress, one entry per upload: what an abort must leave empty."""
        found: list[str] = []
        pages = self._direct.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size})
        for page in pages:
            found.extend(upload["Key"] for upload in page.get("Uploads", []))
        return found

    def reset(self) -> None:
        """Forget every bucket, object and upload (moto's own reset API)."""
        request = urllib.request.Request(self.endpoint + "/moto-api/reset", data=b"", method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            response.read()


# --- fault-injection proxy ---------------------------------------------------------------------------

_IO_TIMEOUT = 60.0  # a stuck test fails on its own timeout, not on a proxy that hangs forever
_MAX_LINE = 65536
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect"}
# query parameters an object read may carry; any other (list-type, uploads, uploadId, tagging...): not a read
_READ_PARAMS = {"versionid", "partnumber", "x-id"}

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY503</RequestId><HostId>faultproxy</HostId></Error>"
)


class _BadMessage(ValueError):
    """The peer sent something that is not HTTP/1.1 as this proxy understands it."""


def _read_head(reader) -> tuple[str, list[tuple[str, str]]] | None:
    """(start line, headers) of one message; None at a clean EOF before any byte."""
    first = reader.readline(_MAX_LINE)
    if not first:
        return None
    if not first.endswith(b"\n"):
        raise _BadMessage("truncated or overlong start line")
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise _BadMessage("truncated header")
        line = line.rstrip(b"\r\n")
        if not line:
            return first.rstrip(b"\r\n").decode("latin-1"), headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise _BadMessage(f"bad header line {line[:80]!r}")
        headers.append((name.strip(), value.strip()))


def _read_exact(reader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise _BadMessage(f"body ended after {len(data)} of {n} bytes")
    return data


def _iter_chunked(reader):
    """The raw bytes of a chunked body, chunk by chunk, up to and including the trailers' blank line."""
    while True:
        line = reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise _BadMessage("truncated chunk size")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadMessage(f"bad chunk size {line[:80]!r}") from None
        if size == 0:
            yield line
            break
        yield line + _read_exact(reader, size + 2)
    while True:
        line = reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise _BadMessage("truncated trailer")
        yield line
        if line in (b"\r\n", b"\n"):
            return


def _iter_sized(reader, n: int, block: int = 1 << 16):
    while n > 0:
        data = reader.read(min(block, n))
        if not data:
            raise _BadMessage("body ended early")
        n -= len(data)
        yield data


def _iter_to_eof(reader, block: int = 1 << 16):
    while data := reader.read1(block):
        yield data


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    value = _header(headers, "content-length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise _BadMessage(f"bad Content-Length {value!r}") from None
    if n < 0:
        raise _BadMessage(f"bad Content-Length {value!r}")
    return n


def _is_chunked(headers: list[tuple[str, str]]) -> bool:
    return "chunked" in (_header(headers, "transfer-encoding") or "").lower()


def _encode_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    """The message head with hop-by-hop headers replaced by `Connection: close`."""
    lines = [start_line]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _is_object_read(target: str) -> bool:
    """GET /bucket/key with at most read parameters: an object's bytes, not a listing or a sub-resource."""
    split = urllib.parse.urlsplit(target)
    bucket, _, key = split.path.lstrip("/").partition("/")
    if not bucket or not key:
        return False
    for name, _ in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
        name = name.lower()
        if name not in _READ_PARAMS and not name.startswith(("response-", "x-amz-")):
            return False
    return True


def _reset(conn: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, i.e. a connection reset, not a clean end."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


StallPredicate = Callable[[str, str, dict], bool]


class FaultProxy:
    """A plain HTTP/1.1 proxy on 127.0.0.1 in front of an S3 endpoint that drops, refuses or holds requests.

    One exchange per client connection (`Connection: close` both ways); urllib3 reconnects by itself.
    Faults follow per-kind request counters, so a sequential client sees a deterministic schedule, and the
    same kind of fault never hits two requests in a row, so bounded client retries always get through:

    - cut_get_every=N: every Nth object read (GET /bucket/key answered 200/206 with >= 2 body bytes) gets
      its response head and about half its body, then a TCP reset.
    - fail_503_every=N: every Nth request is answered `503 Slow Down` by the proxy, never forwarded;
      fail_503_at_most=M: only the first M of them (botocore's adaptive retries slow the client down after
      each, so a run answered 503 all along takes a minute where a few make the point).
    - stall(predicate): from the first matching request on, requests are held unanswered until release().
    - reject(predicate, status, code): matching requests get that S3 error (AccessDenied, a full quota...).
    - drop_headers={"if-none-match", "if-match"}: those request headers are not forwarded (a store that
      ignores conditional writes and overwrites).
    """

    def __init__(self, upstream: str) -> None:
        split = urllib.parse.urlsplit(upstream)
        if split.scheme != "http" or not split.hostname or not split.port:
            raise ValueError(f"FaultProxy needs an http://host:port upstream, got {upstream!r}")
        self.upstream = upstream
        self._upstream_addr = (split.hostname, split.port)
        self.endpoint = ""
        self.cut_get_every: int | None = None
        self.fail_503_every: int | None = None
        self.fail_503_at_most: int | None = None
        self.drop_headers: set[str] = set()   # lower-case names not forwarded (a store that ignores If-None-Match)
        self.counts: dict[str, int] = {"requests": 0, "cuts": 0, "errors_503": 0, "held": 0, "rejected": 0}
        self._lock = threading.Lock()
        self._n_requests = 0  # requests considered for a 503
        self._n_reads = 0  # object reads considered for a cut
        self._last_503 = False
        self._last_cut = False
        self._stall_predicate: StallPredicate | None = None
        self._reject: tuple[StallPredicate, int, str] | None = None
        self._stalling = False
        self._stalled = threading.Event()
        self._released = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    # -- life cycle --

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.1)  # so the accept loop sees stop() promptly
        self._listener = listener
        self.endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name="FaultProxy-accept",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.release()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients, threads = list(self._clients), list(self._threads)
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # unblocks its thread; the thread closes it
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5)

    # -- faults --

    def stall(self, predicate: StallPredicate) -> threading.Event:
        """From now on, the first request for which predicate(method, path_with_query, headers) is true, and
        every request after it, is held (not forwarded, not answered) until release(). Header names are
        lower-cased. Returns an Event set once the first request is held, its body fully received."""
        with self._lock:
            self._stalled = threading.Event()
            if self._released.is_set():
                self._released = threading.Event()
            self._stall_predicate = predicate
            self._stalling = False
            return self._stalled

    def reject(self, predicate: StallPredicate | None, status: int = 403, code: str = "AccessDenied") -> None:
        """Answer every request for which predicate(method, path_with_query, headers) is true with an S3
        error `status`/`code` of the proxy's own, never forwarded; None stops rejecting."""
        with self._lock:
            self._reject = None if predicate is None else (predicate, status, code)

    def release(self) -> None:
        """Close the held connections without an answer, and stop stalling."""
        with self._lock:
            self._stall_predicate = None
            self._stalling = False
            self._released.set()

    def _admit(self, method: str, target: str, headers: list[tuple[str, str]]):
        """'hold', '503' or 'forward' for a new request, with the stall Event to set and the release Event."""
        with self._lock:
            self.counts["requests"] += 1
            if self._stall_predicate is not None and not self._stalling:
                lowered = {k.lower(): v for k, v in headers}
                self._stalling = bool(self._stall_predicate(method, target, lowered))
            if self._stalling:
                self.counts["held"] += 1
                return "hold", self._stalled, self._released
            if self._reject is not None and self._reject[0](method, target, {k.lower(): v for k, v in headers}):
                self.counts["rejected"] += 1
                return "reject", self._reject[1:], None
            self._n_requests += 1
            every = self.fail_503_every
            fail = (bool(every) and self._n_requests % every == 0 and not self._last_503
                    and (self.fail_503_at_most is None or self.counts["errors_503"] < self.fail_503_at_most))
            self._last_503 = fail
            if fail:
                self.counts["errors_503"] += 1
                return "503", None, None
            return "forward", None, None

    def _should_cut(self) -> bool:
        with self._lock:
            self._n_reads += 1
            every = self.cut_get_every
            cut = bool(every) and self._n_reads % every == 0 and not self._last_cut
            self._last_cut = cut
            if cut:
                self.counts["cuts"] += 1
            return cut

    # -- connections --

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(_IO_TIMEOUT)
            thread = threading.Thread(target=self._serve, args=(conn,), name="FaultProxy-conn", daemon=True)
            with self._lock:
                self._clients.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        reset = False
        try:
            reset = self._exchange(conn, reader)
        except (OSError, _BadMessage):
            pass  # the client or upstream went away, or spoke garbage: this connection is over, quietly
        finally:
            reader.close()
            if reset:
                _reset(conn)
            else:
                conn.close()
            with self._lock:
                self._clients.discard(conn)
                self._threads.discard(threading.current_thread())

    def _exchange(self, conn: socket.socket, reader) -> bool:
        """One request/response. True when the connection must end with a reset."""
        head = _read_head(reader)
        if head is None:
            return False
        request_line, headers = head
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadMessage(f"bad request line {request_line[:80]!r}")
        method, target, _ = parts
        decision, stalled, released = self._admit(method, target, headers)
        if self._stopping.is_set() and decision != "hold":
            return False  # stopping: nothing is answered any more (a forward could still deliver bytes)
        expects = (_header(headers, "expect") or "").lower() == "100-continue"

        if decision == "503" and expects:  # a final answer instead of 100 Continue: the body never comes
            self._send_slow_down(conn, method)
            return False
        if decision == "reject" and expects:
            self._send_error(conn, method, *stalled)
            return False
        if expects:  # answered here, and Expect is not forwarded: moto never has to deal with it
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if _is_chunked(headers):
            body = b"".join(_iter_chunked(reader))
        else:
            body = _read_exact(reader, _content_length(headers) or 0)

        if decision == "hold":
            stalled.set()
            while not released.wait(0.1):
                if self._stopping.is_set():
                    break
            return False
        if decision == "503":
            self._send_slow_down(conn, method)
            return False
        if decision == "reject":
            self._send_error(conn, method, *stalled)
            return False
        if self.drop_headers:
            headers = [(k, v) for k, v in headers if k.lower() not in self.drop_headers]
        return self._forward(conn, method, target, request_line, headers, body)

    def _send_slow_down(self, conn: socket.socket, method: str) -> None:
        body = b"" if method == "HEAD" else _SLOW_DOWN_BODY
        head = _encode_head("HTTP/1.1 503 Slow Down", [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("x-amz-request-id", "FAULTPROXY503"),
        ])
        conn.sendall(head + body)

    def _send_error(self, conn: socket.socket, method: str, status: int, code: str) -> None:
        body = b"" if method == "HEAD" else (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>Refused by the test proxy ({code}).</Message>"
            "<RequestId>FAULTPROXY</RequestId></Error>").encode()
        head = _encode_head(f"HTTP/1.1 {status} {code}", [
            ("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
            ("x-amz-request-id", "FAULTPROXY")])
        conn.sendall(head + body)

    def _forward(self, conn: socket.socket, method: str, target: str, request_line: str,
                 headers: list[tuple[str, str]], body: bytes) -> bool:
        with socket.create_connection(self._upstream_addr, timeout=_IO_TIMEOUT) as upstream:
            upstream.sendall(_encode_head(request_line, headers) + body)
            with upstream.makefile("rb") as up_reader:
                while True:
                    head = _read_head(up_reader)
                    if head is None:
                        raise _BadMessage("upstream closed without a response")
                    status_line, resp_headers = head
                    try:
                        status = int(status_line.split(" ", 2)[1])
                    except (IndexError, ValueError):
                        raise _BadMessage(f"bad status line {status_line[:80]!r}") from None
                    if not 100 <= status < 200:
                        break  # an interim 1xx is not relayed: the client was answered 100 Continue already

                length = _content_length(resp_headers)
                if method == "HEAD" or status in (204, 304):
                    chunks = iter(())
                elif _is_chunked(resp_headers):
                    chunks = _iter_chunked(up_reader)
                elif length is not None:
                    chunks = _iter_sized(up_reader, length)
                else:
                    chunks = _iter_to_eof(up_reader)

                cut = (method == "GET" and status in (200, 206) and length is not None and length >= 2
                       and not _is_chunked(resp_headers) and _is_object_read(target) and self._should_cut())
                conn.sendall(_encode_head(status_line, resp_headers))
                if cut:
                    conn.sendall(_read_exact(up_reader, length // 2))
                    return True
                for chunk in chunks:
                    conn.sendall(chunk)
                return False


def fast_retries(monkeypatch) -> None:
    """Keep botocore's retries real but quick: its backoff sleeps scaled to a tenth, and the adaptive
    rate limiter's floor (0.5 requests/s once throttled, i.e. 2 s per request) raised to 50/s."""
    import botocore.endpoint
    import botocore.retries.bucket

    class ScaledTime:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            time.sleep(seconds / 10)

    monkeypatch.setattr(botocore.endpoint, "time", ScaledTime())
    monkeypatch.setattr(botocore.retries.bucket, "TokenBucket",
                        functools.partial(botocore.retries.bucket.TokenBucket, min_rate=50))


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


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto_s3():
    """One moto server for the whole run: starting one costs about a second."""
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_s3):
    """The session's moto server, emptied: every test starts with no buckets."""
    moto_s3.reset()
    return moto_s3


@pytest.fixture
def fault_proxy(s3):
    """A FaultProxy in front of the (emptied) moto server, with no faults yet; stopped after the test."""
    proxy = FaultProxy(s3.endpoint).start()
    yield proxy
    proxy.stop()
