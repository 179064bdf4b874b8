"""The S3 backend. S3 has no rename, so an object is uploaded at its final name: small ones off the
caller's thread, large ones as a multipart upload completed only on commit and aborted otherwise.
Conditional writes are S3's `If-None-Match: *` (create) and `If-Match: ETAG` (replace); a store that
ignores them is found by a probe (`conditional_writes`). Also how a client is made (its retry
policy), the preflight that finds a dead endpoint or missing credentials in seconds (`probe_endpoint`),
and how a prefix is listed."""

from __future__ import annotations

import sys
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Optional

from . import (ENDPOINT_HELP, PROBE_DIR, S3_SCHEME, UNREACHABLE_ERRORS, ObjectWriter, Place, S3Options, Storage,
               StorageError, Tagged, redact_url, s3_error, split_s3)

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
# The preflight (`probe_endpoint`): a dead endpoint is reported in seconds, not after CLIENT_RETRIES backoffs
PROBE_ATTEMPTS = 2
PROBE_CONNECT_TIMEOUT = 3.0   # seconds per connection attempt
PROBE_READ_TIMEOUT = 10.0     # seconds for the answer to a HEAD: a store answers in milliseconds
# A conditional write that lost: the condition failed (412), or a concurrent conditional write won (409)
CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def make_client(options: S3Options, on_call=None, *, probe: bool = False):
    """A boto3 S3 client for `options` with its retry policy; `on_call` sees every response (retry counts).
    `probe`: the preflight's client instead (`probe_endpoint`): PROBE_ATTEMPTS tries, short timeouts."""
    import boto3
    import botocore.config
    import botocore.exceptions as bex
    try:
        session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
    except bex.ProfileNotFound as exc:
        raise StorageError(f"AWS profile {options.profile!r}", f"{exc}; check ~/.aws/config") from None
    if probe:
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": PROBE_ATTEMPTS},
            connect_timeout=PROBE_CONNECT_TIMEOUT, read_timeout=PROBE_READ_TIMEOUT)
    else:
        config = botocore.config.Config(
            retries={"mode": "adaptive", "max_attempts": CLIENT_RETRIES},
            connect_timeout=10, read_timeout=60, max_pool_connections=UPLOAD_THREADS + 8)
    try:
        client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
    except ValueError as exc:   # botocore: "Invalid endpoint: host:9000" (no scheme)
        raise StorageError(f"S3 endpoint {options.endpoint_url!r}",
                           f"{exc}; an endpoint URL looks like http://host:port or https://host") from None
    if on_call is not None:
        client.meta.events.register("after-call.s3", on_call)
    return client


def probe_endpoint(options: S3Options, bucket: str):
    """True when the store at `options`' endpoint answers a HEAD of `bucket` (any answer: 403 and 404 too),
    else the (reason, code) of why not: no credentials, nothing listening, a connect that times out, a
    server that takes the connection but gives no HTTP answer (not an S3 endpoint)."""
    import botocore.exceptions as bex
    endpoint = options.endpoint_url
    try:
        client = make_client(options, probe=True)
        endpoint = client.meta.endpoint_url   # also when it comes from AWS_ENDPOINT_URL or the config file
        client.head_bucket(Bucket=bucket)
    except StorageError as exc:   # no such profile, a malformed endpoint URL: the message names which
        return str(exc), exc.code
    except bex.ClientError:
        pass   # an answer: the store is there (the request itself says what else is wrong)
    except Exception as exc:
        error = s3_error(f"{S3_SCHEME}{bucket}", exc)
        tries = f"{PROBE_ATTEMPTS} tries"
        if error.code in UNREACHABLE_ERRORS:
            return (f"cannot reach the S3 endpoint {redact_url(endpoint)} ({tries}, {PROBE_CONNECT_TIMEOUT:g} s "
                    f"connect timeout; last: {error.code}); {ENDPOINT_HELP}"), error.code
        if isinstance(exc, (bex.ReadTimeoutError, bex.ConnectionClosedError)):
            return (f"the S3 endpoint {redact_url(endpoint)} took the connection but gave no answer ({tries}, "
                    f"{PROBE_READ_TIMEOUT:g} s each; last: {error.code}): is it an S3 endpoint? {ENDPOINT_HELP}"), \
                error.code
        return error.reason, error.code
    return True


def list_tar_objects(storage: Storage, url: str, options: Optional[S3Options]) -> list[tuple[str, int]]:
    """Every `.tar` under an s3:// prefix (recursive, sorted) with its size; a `.tar` URL is itself."""
    bucket, key = split_s3(url)
    client = storage.s3_client(url, options)
    if key.endswith(".tar"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise s3_error(url, exc, "cannot read") from None
        return [(url, int(head["ContentLength"]))]
    prefix = key if not key or key.endswith("/") else key + "/"
    return [(f"{S3_SCHEME}{bucket}/{k}", size) for k, size in list_objects(client, bucket, prefix, url)
            if k.endswith(".tar")]


def list_objects(client, bucket: str, prefix: str, url: str, start_after: str = "") -> list[tuple[str, int]]:
    """Every key under `prefix` (after `start_after`, when given) with its size, sorted (all pages)."""
    found = []
    extra = {"StartAfter": start_after} if start_after else {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra):
            found.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", ()))
    except Exception as exc:
        raise s3_error(url, exc, "cannot list") from None
    return sorted(found)


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
        self._conditional: Optional[bool] = None   # conditional_writes(), once probed

    @property
    def client(self):
        return self.storage.s3_client(self.url, self.options)

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

    def read_tagged(self, relative: str) -> Optional[Tagged]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))
            return Tagged(response["Body"].read(), response["ETag"])
        except Exception as exc:
            error = s3_error(self.child(relative), exc, "cannot read")
            if error.code in ("NoSuchKey", "404"):
                return None
            raise error from None

    def replace(self, relative: str, data: bytes, tag: Optional[str]) -> Optional[str]:
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=data, **condition)["ETag"]
        except Exception as exc:
            error = s3_error(self.child(relative), exc, "cannot write")
            if error.code in CONDITION_FAILED or (tag is not None and error.code in ("NoSuchKey", "404")):
                return None
            raise error from None

    def conditional_writes(self) -> bool:
        """Create one probe object twice: a store that honours If-None-Match refuses the second."""
        if self._conditional is None:
            probe = f"{PROBE_DIR}/conditional-{uuid.uuid4().hex}"
            try:
                first = self.create(probe, b"1")
                try:
                    second = self.create(probe, b"2")
                except StorageError as exc:
                    if exc.code not in UNSUPPORTED_CODES + ("InvalidArgument", "400"):
                        raise
                    second = True   # the store refuses the header: no conditional writes
                self._conditional = first and not second
            finally:
                self.delete([probe])
        return self._conditional

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

    def list(self, prefix: str = "", start_after: str = "") -> dict[str, int]:
        rel_prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        found = list_objects(self.client, self.bucket, self.prefix + rel_prefix, self.url,
                             self.key(start_after) if start_after else "")
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

    def remove_unfinished(self, owned: Optional[Callable[[str], bool]] = None) -> int:
        """Abort the multipart uploads an interrupted run left open (they are billed until aborted; only
        those `owned` says are ours, given the path relative to the place).

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
            if owned is not None and not owned(key[len(self.prefix):]):
                continue
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
