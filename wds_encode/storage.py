"""Where bytes come from and go to: local paths and `s3://` URLs behind one interface.

This is the only module that talks to S3 (boto3, with its normal credential chain). Inputs are
listed (`list_tars`) and streamed (`open_read`: a dropped S3 stream continues with a ranged GET
from the byte it reached, pinned to the object's ETag). Outputs go to a `Place`, the root of a
run's output, local (`LocalPlace`) or on S3 (`S3Place`), which hides the one real difference:
a local file is written under a temporary name and renamed into place, while S3 has no rename,
so an S3 object is uploaded at its final name (small ones off the caller's thread, large ones
as a multipart upload that is completed only on commit and aborted otherwise).

A `Storage` holds this process's boto3 clients, made lazily and never shared across a fork, so
a DataLoader worker that receives a copy makes its own.
"""

from __future__ import annotations

import errno
import io
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

S3_SCHEME = "s3://"
PARTIAL = ".partial"
PROBE_DIR = ".wds-encode-probe"

READ_ATTEMPTS = 6             # tries to continue one broken stream, without progress in between
READ_BACKOFF_SECONDS = 0.2    # doubled per failed try, with jitter
READ_BUFFER = 1 << 20
READ_CHUNK = 256 << 10        # bytes asked of the socket at a time: what a break can lose and re-read
PART_SIZE = 8 << 20           # multipart part size (S3's minimum is 5 MiB)
# What a store answers for an API it does not have (s3rver: NotImplemented for ListMultipartUploads)
UNSUPPORTED_CODES = ("NotImplemented", "NotSupported", "MethodNotAllowed", "UnsupportedOperation", "501", "405")
LIFECYCLE_RULE = ('{"Rules": [{"ID": "abort-incomplete-uploads", "Status": "Enabled", "Filter": {}, '
                  '"AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]} '
                  "(aws s3api put-bucket-lifecycle-configuration --bucket BUCKET --lifecycle-configuration ...)")
UPLOAD_THREADS = 8
UPLOAD_BYTES_IN_FLIGHT = 256 << 20
DELETE_BATCH = 1000           # S3 DeleteObjects takes at most 1000 keys
RECORD_READ_THREADS = 32
CLIENT_RETRIES = 10           # botocore attempts per request (adaptive mode: 503 SlowDown, throttling, 5xx)

# S3 error codes (and HTTP 507) that mean "no room left", not "try again"
FULL_CODES = {"QuotaExceeded", "XMinioAdminBucketQuotaExceeded", "XMinioStorageFull", "StorageFull",
              "InsufficientStorage", "ServiceQuotaExceeded", "EntityTooLarge"}
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


class StorageError(OSError):
    """A place could not be read or written; `place` says where, `reason` why (e.g. AccessDenied)."""

    def __init__(self, place: str, reason: str, code: str = ""):
        super().__init__(f"{redact_url(place)}: {redact_url(reason)}")
        self.place = redact_url(place)
        self.reason = redact_url(reason)
        self.code = code          # the S3 error code (NoSuchKey, AccessDenied...) when there is one

    def __reduce__(self):  # rebuilt from its parts, so it can cross a process boundary
        return (type(self), (self.place, self.reason, self.code))


class StorageFull(StorageError):
    """The place filled up (disk full, quota): free space, then rerun."""


def redact_url(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://***@host` in a URL, or in any text that holds URLs:
    an endpoint URL can carry credentials."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))


_SECRET_KEY = re.compile(r"(^|_)(secret|password|passwd|token|credentials?|access_key(_id)?|api_key)($|_)")
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _secret_field(name) -> bool:
    """aws_secret_access_key, SessionToken, api-key, password... but not num_tokens or token_dim's number."""
    return isinstance(name, str) and bool(_SECRET_KEY.search(_CAMEL_HUMP.sub("_", name).replace("-", "_").lower()))


def redact(value):
    """A JSON-native value with credentials removed: secret-looking fields masked, URL user info
    stripped. Applied to everything a run writes about its own configuration (details.json)."""
    if isinstance(value, dict):
        return {k: ("***" if _secret_field(k) and isinstance(v, str) and v else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def is_s3(url: str | Path) -> bool:
    return str(url).startswith(S3_SCHEME)


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: no bucket name")
    return bucket, key


def join(base: str, relative: str) -> str:
    if is_s3(base):
        return base.rstrip("/") + "/" + relative.lstrip("/")
    return os.path.join(base, relative)


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store. None means boto3's own chain decides
    (AWS_PROFILE, AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, ~/.aws/config...)."""

    profile: Optional[str] = None
    endpoint_url: Optional[str] = None
    region: Optional[str] = None

    def over(self, defaults: "S3Options") -> "S3Options":
        """These options, with the unset ones taken from `defaults`."""
        return S3Options(profile=self.profile or defaults.profile,
                         endpoint_url=self.endpoint_url or defaults.endpoint_url,
                         region=self.region or defaults.region)


def _client_error_code(exc: BaseException) -> tuple[str, str]:
    """(code, message) of a botocore error, or of anything else."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code, str(err.get("Message") or exc)
    return type(exc).__name__, str(exc)


def s3_error(place: str, exc: BaseException, doing: str = "") -> StorageError:
    """A botocore/network exception -> StorageError (StorageFull for quota codes), message with the code."""
    code, message = _client_error_code(exc)
    response = getattr(exc, "response", None)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    reason = message if code in message else f"{code}: {message}"
    if doing:
        reason = f"{doing}: {reason}"
    cls = StorageFull if (code in FULL_CODES or status == 507) else StorageError
    return cls(place, reason, code)


def local_error(place: str, exc: OSError, doing: str = "") -> StorageError:
    """An OSError on a local path -> StorageError (StorageFull for ENOSPC / EDQUOT)."""
    reason = f"{doing + ': ' if doing else ''}{exc.strerror or exc}"
    cls = StorageFull if exc.errno in FULL_ERRNOS else StorageError
    return cls(place, reason)


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection broke mid-body": the read continues with a ranged GET."""
    import http.client

    import botocore.exceptions as bex
    import urllib3.exceptions as uex
    return (bex.ResponseStreamingError, bex.ReadTimeoutError, bex.IncompleteReadError, bex.ConnectionClosedError,
            bex.EndpointConnectionError, bex.ConnectionError, uex.HTTPError, http.client.HTTPException,
            ConnectionError, socket.timeout, TimeoutError)


class Storage:
    """Opens inputs and output places by URL; holds this process's S3 clients and retry counters."""

    def __init__(self, defaults: S3Options = S3Options()):
        self.defaults = defaults
        self._clients: dict = {}
        self._lock = threading.Lock()
        self.retries = 0       # requests botocore had to repeat (503 SlowDown, 5xx, dropped connections)
        self.resumes = 0       # broken read streams continued with a ranged GET

    def __getstate__(self) -> dict:
        return {"defaults": self.defaults}  # clients and locks are per process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["defaults"])

    # ------------------------------------------------------------------ clients
    def client(self, options: Optional[S3Options] = None):
        """The boto3 S3 client of this process for `options` (made on first use, after any fork)."""
        options = (options or S3Options()).over(self.defaults)
        key = (os.getpid(), options)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self._make_client(options)
        return client

    def _make_client(self, options: S3Options):
        import boto3
        import botocore.config
        import botocore.exceptions as bex
        try:
            session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
        except bex.ProfileNotFound as exc:
            raise StorageError(f"AWS profile {options.profile!r}", f"{exc}; check ~/.aws/config") from None
        config = botocore.config.Config(
            retries={"mode": "adaptive", "max_attempts": CLIENT_RETRIES},
            connect_timeout=10, read_timeout=60, max_pool_connections=UPLOAD_THREADS + 8)
        client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
        client.meta.events.register("after-call.s3", self._count_retries)
        return client

    def _count_retries(self, parsed=None, **_kwargs) -> None:
        attempts = (parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if attempts:
            with self._lock:
                self.retries += attempts

    def counters(self) -> dict:
        return {"retries": self.retries, "resumes": self.resumes}

    # ------------------------------------------------------------------ inputs
    def list_tars(self, url: str, options: Optional[S3Options] = None) -> list[tuple[str, int]]:
        """Every `.tar` under an s3:// prefix (recursive, sorted) with its size; a `.tar` URL is itself."""
        bucket, key = split_s3(url)
        client = self.client(options)
        if key.endswith(".tar"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                raise s3_error(url, exc, "cannot read") from None
            return [(url, int(head["ContentLength"]))]
        prefix = key if not key or key.endswith("/") else key + "/"
        return [(f"{S3_SCHEME}{bucket}/{k}", size) for k, size in self._list(client, bucket, prefix, url)
                if k.endswith(".tar")]

    def _list(self, client, bucket: str, prefix: str, url: str) -> list[tuple[str, int]]:
        found = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", ()))
        except Exception as exc:
            raise s3_error(url, exc, "cannot list") from None
        return sorted(found)

    def open_read(self, url: str, options: Optional[S3Options] = None) -> BinaryIO:
        """A buffered binary stream of a local file or an S3 object (read once, front to back)."""
        if not is_s3(url):
            try:
                return open(url, "rb")
            except OSError as exc:
                raise local_error(url, exc, "cannot read") from None
        return io.BufferedReader(S3ReadStream(self, url, options), buffer_size=READ_BUFFER)

    def read_bytes(self, url: str, options: Optional[S3Options] = None) -> bytes:
        with self.open_read(url, options) as f:
            return f.read()

    # ------------------------------------------------------------------ outputs
    def place(self, url: str | Path, options: Optional[S3Options] = None) -> "Place":
        url = str(url)
        if is_s3(url):
            return S3Place(self, url, options)
        return LocalPlace(url)


class S3ReadStream(io.RawIOBase):
    """An S3 object as a raw stream that survives dropped connections.

    When the body breaks mid-read (reset, timeout, truncated), it is re-requested from the byte
    reached, with `Range` and `IfMatch=<ETag>` (a changed object is an error, not a silent splice),
    with backoff, up to READ_ATTEMPTS times without progress in between.
    """

    def __init__(self, storage: Storage, url: str, options: Optional[S3Options]):
        super().__init__()
        self.storage = storage
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.client = storage.client(options)
        self.pos = 0
        self.size: Optional[int] = None
        self.etag: Optional[str] = None
        self._body = None
        self._failures = 0
        self._broken = _stream_errors()

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        import botocore.exceptions as bex
        args = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            args["Range"] = f"bytes={self.pos}-"
        if self.etag:
            args["IfMatch"] = self.etag
        try:
            response = self.client.get_object(**args)
        except bex.ClientError as exc:
            code, _ = _client_error_code(exc)
            if code in ("InvalidRange", "416") and self.size is not None and self.pos >= self.size:
                self._body = io.BytesIO(b"")
                return
            if code in ("PreconditionFailed", "412"):
                raise StorageError(self.url, f"the object changed while it was being read (ETag {self.etag}); "
                                             "rerun to read the new version") from None
            raise s3_error(self.url, exc, "cannot read") from None
        if self.etag is None:
            self.etag = response.get("ETag")
            self.size = int(response.get("ContentLength", 0))
        body = response["Body"]
        if self.pos and not response.get("ContentRange"):  # the server ignored Range: skip what we have
            remaining = self.pos
            while remaining:
                chunk = body.read(min(remaining, READ_BUFFER))
                if not chunk:
                    raise StorageError(self.url, f"object ended at byte {self.pos - remaining} while resuming")
                remaining -= len(chunk)
        self._body = body

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(min(len(buffer), READ_CHUNK))
                if not data and self.size is not None and self.pos < self.size:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
            except StorageError:
                raise
            except self._broken as exc:
                self._drop_body()
                self._failures += 1
                if self._failures >= READ_ATTEMPTS:
                    raise StorageError(self.url, f"the connection broke {self._failures} times at byte {self.pos} "
                                                 f"without progress; last: {type(exc).__name__}: {exc}") from None
                with self.storage._lock:
                    self.storage.resumes += 1
                time.sleep(READ_BACKOFF_SECONDS * (2 ** (self._failures - 1)) * (0.5 + random.random()))
                continue
            n = len(data)
            buffer[:n] = data
            self.pos += n
            if n:
                self._failures = 0
            return n

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_body()
        super().close()


# ---------------------------------------------------------------------- output places

class Place:
    """The root of a run's output. Paths given to its methods are relative, with `/` separators.

    - `read` / `write` / `delete` / `list`: whole objects (`write` is atomic: a reader sees the old
      object or the new one, never a part).
    - `stage` / `publish` / `unstage`: small files that must become visible together with their
      unit (the folder layout). Locally they are written as `*.partial` and renamed on publish; on
      S3 they are uploaded at their final names in the background, and publish waits for them.
    - `open_object`: a large object written as a stream (a latent tar), visible only on `commit`.
    """

    url: str

    def child(self, relative: str) -> str:
        return join(self.url, relative)

    def read(self, relative: str) -> Optional[bytes]: ...
    def write(self, relative: str, data: bytes) -> None: ...
    def delete(self, relatives: Iterable[str]) -> int: ...
    def list(self, prefix: str = "") -> dict[str, int]: ...
    def stage(self, relative: str, data: bytes) -> None: ...
    def publish(self, relatives: list[str]) -> None: ...
    def unstage(self, relatives: list[str]) -> None: ...
    def open_object(self, relative: str) -> "ObjectWriter": ...
    def remove_unfinished(self) -> int: ...

    def read_many(self, relatives: list[str]) -> dict[str, Optional[bytes]]:
        return {rel: self.read(rel) for rel in relatives}

    def check_writable(self) -> None:
        """Write and delete a probe object; a StorageError says why the place cannot take output."""
        probe = f"{PROBE_DIR}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.write(probe, b"wds-encode write probe\n")
        self.delete([probe])

    def close(self) -> None:
        """Wait for background uploads (raising the first failure) and release resources."""


class ObjectWriter:
    """A stream into one object of a Place; nothing is visible until `commit`."""

    def write(self, data: bytes) -> int: ...
    def finish(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def _rename_into_place(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise local_error(str(target), exc, "cannot rename into place") from None


class LocalPlace(Place):
    def __init__(self, url: str):
        self.url = str(url)
        self.root = Path(url)

    def _path(self, relative: str) -> Path:
        return self.root / relative

    def read(self, relative: str) -> Optional[bytes]:
        try:
            return self._path(relative).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise local_error(str(self._path(relative)), exc, "cannot read") from None

    def _write_file(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                path.unlink(missing_ok=True)  # a truncated file helps nobody on a full disk
            raise local_error(str(path), exc, "cannot write") from None

    def write(self, relative: str, data: bytes) -> None:
        final = self._path(relative)
        tmp = final.with_name(final.name + PARTIAL)
        self._write_file(tmp, data)
        _rename_into_place(tmp, final)

    def delete(self, relatives: Iterable[str]) -> int:
        count = 0
        for rel in relatives:
            try:
                self._path(rel).unlink()
                count += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise local_error(str(self._path(rel)), exc, "cannot delete") from None
        return count

    def list(self, prefix: str = "") -> dict[str, int]:
        """Files under `prefix` (a folder, relative), recursively: relative path -> size."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        found = {}
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    found[os.path.relpath(path, self.root).replace(os.sep, "/")] = os.path.getsize(path)
                except FileNotFoundError:
                    continue
        return found

    def stage(self, relative: str, data: bytes) -> None:
        final = self._path(relative)
        self._write_file(final.with_name(final.name + PARTIAL), data)

    def publish(self, relatives: list[str]) -> None:
        for rel in relatives:
            final = self._path(rel)
            _rename_into_place(final.with_name(final.name + PARTIAL), final)

    def unstage(self, relatives: list[str]) -> None:
        for rel in relatives:
            final = self._path(rel)
            final.with_name(final.name + PARTIAL).unlink(missing_ok=True)

    def open_object(self, relative: str) -> "ObjectWriter":
        return LocalObjectWriter(self._path(relative))

    def check_writable(self) -> None:
        """A probe file in the output folder itself, deleted at once (a probe folder would stay behind,
        and removing it would race with another rank's probe); a leftover is a `*.partial`."""
        name = f"{PROBE_DIR}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}"
        probe = self._path(name)
        self._write_file(probe, b"wds-encode write probe\n")
        try:
            probe.unlink()
        except OSError as exc:
            raise local_error(str(probe), exc, "cannot delete") from None

    def remove_unfinished(self) -> int:
        """Delete `*.partial` files an interrupted run left behind."""
        partials = [rel for rel in self.list() if rel.endswith(PARTIAL)]
        return self.delete(partials)


class LocalObjectWriter(ObjectWriter):
    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + PARTIAL)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: Optional[BinaryIO] = open(self.tmp, "wb")
        except OSError as exc:
            raise local_error(str(self.tmp), exc, "cannot write") from None

    def write(self, data: bytes) -> int:
        assert self._file is not None
        try:
            return self._file.write(data)
        except OSError as exc:
            raise local_error(str(self.path), exc, "cannot write") from None

    def finish(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                raise local_error(str(self.path), exc, "cannot write") from None
            self._file = None

    def commit(self) -> None:
        self.finish()
        _rename_into_place(self.tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)


class _BytesBudget:
    """Blocks a producer while more than `limit` bytes are waiting to be uploaded."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class S3Place(Place):
    """An `s3://bucket/prefix/` output. Uploads run on a small thread pool, bounded in bytes."""

    def __init__(self, storage: Storage, url: str, options: Optional[S3Options] = None):
        self.storage = storage
        self.options = options
        self.bucket, key = split_s3(url)
        self.prefix = key if not key or key.endswith("/") else key + "/"
        self.url = f"{S3_SCHEME}{self.bucket}/{self.prefix}"
        self._pool: Optional[ThreadPoolExecutor] = None
        self._budget = _BytesBudget(UPLOAD_BYTES_IN_FLIGHT)
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._warned_unsupported = False

    @property
    def client(self):
        return self.storage.client(self.options)

    def key(self, relative: str) -> str:
        return self.prefix + relative.lstrip("/")

    def read(self, relative: str) -> Optional[bytes]:
        """The object's bytes (a dropped stream continues where it broke), or None when there is none."""
        try:
            return self.storage.read_bytes(self.child(relative), self.options)
        except StorageError as exc:
            if exc.code in ("NoSuchKey", "404"):
                return None
            raise

    def read_many(self, relatives: list[str]) -> dict[str, Optional[bytes]]:
        if len(relatives) <= 1:
            return super().read_many(relatives)
        with ThreadPoolExecutor(RECORD_READ_THREADS, thread_name_prefix="wds-encode-read") as pool:
            return dict(zip(relatives, pool.map(self.read, relatives)))

    def write(self, relative: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=data)
        except Exception as exc:
            raise s3_error(self.child(relative), exc, "cannot write") from None

    def delete(self, relatives: Iterable[str]) -> int:
        keys = [self.key(rel) for rel in relatives]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except Exception as exc:
                raise s3_error(self.url, exc, "cannot delete") from None
            failed = response.get("Errors") or []
            if failed:
                first = failed[0]
                raise StorageError(f"{S3_SCHEME}{self.bucket}/{first.get('Key')}",
                                   f"cannot delete: {first.get('Code')}: {first.get('Message')} "
                                   f"({len(failed)} keys not deleted)")
        return len(keys)

    def list(self, prefix: str = "") -> dict[str, int]:
        rel_prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        found = self.storage._list(self.client, self.bucket, self.prefix + rel_prefix, self.url)
        return {key[len(self.prefix):]: size for key, size in found}

    # --- background uploads (the folder layout)
    def _submit(self, relative: str, fn, size: int) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="wds-encode-upload")
            pool = self._pool
        self._budget.take(size)

        def run():
            try:
                return fn()
            finally:
                self._budget.give(size)
        return pool.submit(run)

    def stage(self, relative: str, data: bytes) -> None:
        future = self._submit(relative, lambda: self.write(relative, data), len(data))
        with self._lock:
            self._pending[relative] = future

    def _wait(self, relatives: list[str]) -> None:
        first_error: Optional[BaseException] = None
        for rel in relatives:
            with self._lock:
                future = self._pending.pop(rel, None)
            if future is None:
                continue
            exc = future.exception()
            if exc is not None and first_error is None:
                first_error = exc
        if first_error is not None:
            raise first_error

    def publish(self, relatives: list[str]) -> None:
        self._wait(relatives)

    def unstage(self, relatives: list[str]) -> None:
        try:
            self._wait(relatives)
        finally:
            self.delete(relatives)

    def open_object(self, relative: str) -> "ObjectWriter":
        return S3ObjectWriter(self, relative)

    def uploads_in_progress(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload under this place that was never completed."""
        found = []
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                found.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", ()))
        except Exception as exc:
            raise s3_error(self.url, exc, "cannot list multipart uploads") from None
        return found

    def remove_unfinished(self) -> int:
        """Abort the multipart uploads an interrupted run left open (they are billed until aborted).

        An open upload is invisible to every reader, so exactly-once does not depend on this clean-up: on
        a store that does not implement listing or aborting uploads (s3rver, some S3-compatible stores) it
        is skipped with one warning naming the lifecycle rule that does it instead."""
        try:
            uploads = self.uploads_in_progress()
        except StorageError as exc:
            if exc.code not in UNSUPPORTED_CODES:
                raise
            self._warn_unsupported("list multipart uploads", exc)
            return 0
        aborted = 0
        for key, upload_id in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                aborted += 1
            except Exception as exc:
                error = s3_error(f"{S3_SCHEME}{self.bucket}/{key}", exc, "cannot abort upload")
                if error.code not in UNSUPPORTED_CODES:
                    raise error from None
                self._warn_unsupported("abort multipart uploads", error)
        return aborted

    def _warn_unsupported(self, what: str, error: StorageError) -> None:
        if self._warned_unsupported:
            return
        self._warned_unsupported = True
        print(f"wds-encode: warning: {redact_url(self.url)}: this store cannot {what} ({error.code}), so uploads "
              "an interrupted run left open stay (unseen by readers, but billed where the store bills them); "
              f"let the bucket clean them up with a lifecycle rule: {LIFECYCLE_RULE}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            pending = list(self._pending)
        try:
            self._wait(pending)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class S3ObjectWriter(ObjectWriter):
    """A multipart upload: parts go up as the data comes, the object appears on `commit`.

    On `abort` (or an error) the upload is aborted, so no half object is left billed.
    """

    def __init__(self, place: S3Place, relative: str):
        self.place = place
        self.relative = relative
        self.key = place.key(relative)
        self.url = place.child(relative)
        self._buffer = bytearray()
        self._upload_id: Optional[str] = None
        self._parts: list[Future] = []

    def _start(self) -> str:
        if self._upload_id is None:
            try:
                self._upload_id = self.place.client.create_multipart_upload(
                    Bucket=self.place.bucket, Key=self.key)["UploadId"]
            except Exception as exc:
                raise s3_error(self.url, exc, "cannot start upload") from None
        return self._upload_id

    def _send_part(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        upload_id = self._start()
        number = len(self._parts) + 1

        def upload():
            try:
                response = self.place.client.upload_part(Bucket=self.place.bucket, Key=self.key, UploadId=upload_id,
                                                         PartNumber=number, Body=data)
            except Exception as exc:
                raise s3_error(self.url, exc, f"cannot upload part {number}") from None
            return {"PartNumber": number, "ETag": response["ETag"]}
        self._parts.append(self.place._submit(self.relative, upload, len(data)))

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= PART_SIZE:
            self._send_part()
        return len(data)

    def finish(self) -> None:
        """Send what is buffered as the last part (the object still does not exist)."""
        if self._buffer or not self._parts:
            self._send_part()

    def commit(self) -> None:
        try:
            self.finish()
            parts = [f.result() for f in self._parts]
        except BaseException:
            self.abort()
            raise
        try:
            self.place.client.complete_multipart_upload(
                Bucket=self.place.bucket, Key=self.key, UploadId=self._upload_id,
                MultipartUpload={"Parts": parts})
        except Exception as exc:
            self.abort()
            raise s3_error(self.url, exc, "cannot complete upload") from None

    def abort(self) -> None:
        for future in self._parts:
            future.exception()  # wait; the error (if any) no longer matters
        self._buffer.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self.place.client.abort_multipart_upload(Bucket=self.place.bucket, Key=self.key, UploadId=upload_id)
            except Exception:
                pass  # an upload left open is aborted by the next run's remove_unfinished
