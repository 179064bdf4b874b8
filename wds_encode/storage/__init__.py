"""Where bytes come from and go to: local paths and `s3://` URLs behind one interface.

The only place that talks to S3 (boto3, with its normal credential chain). Here is what every
backend shares: the `Storage` entry point (inputs listed and read by URL, outputs opened as a
`Place`), the `Place` / `ObjectWriter` interface, URL helpers, redaction and the errors. Each
backend has its own module, as fsspec keeps one implementation per protocol: `local` (a temporary
name renamed into place), `s3` (no rename: uploads at the final name, multipart for large objects)
and `stream` (S3 reads that survive dropped connections).

A `Storage` holds this process's boto3 clients, made lazily and never shared across a fork, so
a DataLoader worker that receives a copy makes its own. Before its first request to a bucket it runs
a preflight (`check_reachable`: one HEAD with few retries and short timeouts), so that a dead endpoint
or missing credentials are one clear StorageError in seconds, not a minute of retries or a botocore
traceback; copies inherit what it found.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

S3_SCHEME = "s3://"
PARTIAL = ".partial"
PROBE_DIR = ".wds-encode-probe"

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


# botocore errors raised before any request is sent: no credentials anywhere in boto3's chain
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
# what it takes to give boto3 credentials, in the words of our options
CREDENTIALS_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a profile that has them with "
                    "--s3-profile (or AWS_PROFILE; a dataset's own \"profile\" for its s3:// inputs)")
# botocore errors that mean no connection could be made: nothing answered at the endpoint
UNREACHABLE_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError", "SSLError")
ENDPOINT_HELP = "check --s3-endpoint-url (or AWS_ENDPOINT_URL, a dataset's \"endpoint_url\") and the network"


def _credential_files() -> str:
    """Where boto3 looked for profiles, for a message: the files named by the environment, or the defaults."""
    return ", ".join(f"{os.environ.get(var) or default} ({var})" for var, default in (
        ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")))


def s3_error(place: str, exc: BaseException, doing: str = "") -> StorageError:
    """A botocore/network exception -> StorageError (StorageFull for quota codes), message with the code.
    A StorageError passes through unchanged (it already says where and why)."""
    if isinstance(exc, StorageError):
        return exc
    code, message = _client_error_code(exc)
    if code == "NoCredentialsError":
        return StorageError(place, f"no AWS credentials found (looked in the environment, {_credential_files()} "
                                   f"and the instance metadata): {CREDENTIALS_HELP}", code)
    if code in CREDENTIAL_ERRORS:
        return StorageError(place, f"the AWS credentials are unusable ({message}): {CREDENTIALS_HELP}", code)
    if code in UNREACHABLE_ERRORS:
        return StorageError(place, f"{doing + ': ' if doing else ''}cannot reach the S3 endpoint ({code}: {message}); "
                                   f"{ENDPOINT_HELP}", code)
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


class Storage:
    """Opens inputs and output places by URL; holds this process's S3 clients and retry counters."""

    def __init__(self, defaults: S3Options = S3Options()):
        self.defaults = defaults
        self._clients: dict = {}
        self._lock = threading.Lock()
        self.retries = 0       # requests botocore had to repeat (503 SlowDown, 5xx, dropped connections)
        self.resumes = 0       # broken read streams continued with a ranged GET
        # (options, bucket) -> True once the store answered there, or the (reason, code) of why it cannot be
        # reached: `check_reachable`'s answers, handed to forked and pickled copies (DataLoader workers)
        self._reached: dict = {}
        self._probing = threading.Lock()   # one preflight at a time: threads that need it wait for its answer

    def __getstate__(self) -> dict:
        with self._lock:   # clients and locks are per process; what the preflight found is not
            return {"defaults": self.defaults, "reached": dict(self._reached)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["defaults"])
        self._reached.update(state.get("reached", {}))

    # ------------------------------------------------------------------ clients
    def client(self, options: Optional[S3Options] = None):
        """The boto3 S3 client of this process for `options` (made on first use, after any fork)."""
        options = (options or S3Options()).over(self.defaults)
        key = (os.getpid(), options)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = make_client(options, self._count_retries)
        return client

    def s3_client(self, url: str, options: Optional[S3Options] = None):
        """The client for an s3:// URL, once `check_reachable` has found its store answering."""
        self.check_reachable(url, options)
        return self.client(options)

    def check_reachable(self, url: str, options: Optional[S3Options] = None) -> None:
        """A preflight, once per endpoint and bucket: one HEAD of the bucket with few retries and short
        connect timeouts, so that a wrong endpoint or missing credentials are a StorageError in seconds
        rather than after the minute the full retry policy (`make_client`) spends on a dead endpoint.
        Any answer of the store (even 403 or 404) passes: the request itself then says what is wrong."""
        resolved = (options or S3Options()).over(self.defaults)
        bucket, _ = split_s3(url)
        key = (resolved, bucket)
        with self._lock:
            found = self._reached.get(key)
        if found is None:
            with self._probing:
                with self._lock:
                    found = self._reached.get(key)
                if found is None:
                    found = probe_endpoint(resolved, bucket)
                    with self._lock:
                        self._reached[key] = found
        if found is not True:
            reason, code = found
            raise StorageError(url, reason, code)

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
        return list_tar_objects(self, url, options)

    def open_read(self, url: str, options: Optional[S3Options] = None) -> BinaryIO:
        """A buffered binary stream of a local file or an S3 object (read once, front to back)."""
        if not is_s3(url):
            try:
                return open(url, "rb")
            except OSError as exc:
                raise local_error(url, exc, "cannot read") from None
        return open_s3(self, url, options)

    def read_bytes(self, url: str, options: Optional[S3Options] = None) -> bytes:
        with self.open_read(url, options) as f:
            return f.read()

    # ------------------------------------------------------------------ outputs
    def place(self, url: str | Path, options: Optional[S3Options] = None) -> "Place":
        url = str(url)
        if is_s3(url):
            return S3Place(self, url, options)
        return LocalPlace(url)


# ---------------------------------------------------------------------- output places

class Place:
    """The root of a run's output. Paths given to its methods are relative, with `/` separators.

    - `read` / `write` / `delete` / `list`: whole objects (`write` is atomic: a reader sees the old
      object or the new one, never a part); `list(prefix, start_after=...)` lists, sorted by path,
      only what comes after a path (S3's StartAfter: one request for the newest objects of a folder).
    - `stage` / `publish` / `unstage`: small files that must become visible together with their
      unit (the folder layout). Locally they are written as `*.partial` and renamed on publish; on
      S3 they are uploaded at their final names in the background, and publish waits for them.
    - `open_object`: a large object written as a stream (a latent tar), visible only on `commit`.
    - `create` / `read_tagged` / `replace`: conditional writes (create-if-absent, write-if-unchanged):
      a unit commits by creating its record, leases are taken and renewed by replacing their object.
    - Temporary names (`*.partial`) are never listed: they are not data.
    """

    url: str

    def child(self, relative: str) -> str:
        return join(self.url, relative)

    def read(self, relative: str) -> Optional[bytes]: ...
    def write(self, relative: str, data: bytes) -> None: ...
    def delete(self, relatives: Iterable[str]) -> int: ...
    def list(self, prefix: str = "", start_after: str = "") -> dict[str, int]: ...
    def stage(self, relative: str, data: bytes) -> None: ...
    def publish(self, relatives: list[str]) -> None: ...
    def unstage(self, relatives: list[str]) -> None: ...
    def open_object(self, relative: str) -> "ObjectWriter": ...
    def remove_unfinished(self, owned: Optional[Callable[[str], bool]] = None) -> int: ...

    def read_many(self, relatives: list[str]) -> dict[str, Optional[bytes]]:
        return {rel: self.read(rel) for rel in relatives}

    # --- conditional writes: what the commit protocol and the leases are built on
    def create(self, relative: str, data: bytes) -> bool:
        """Write the object only if it does not exist (S3 `If-None-Match: *`, locally a hard link):
        True when this call created it, False when it was there. Of several writers racing, one wins."""
        return self.replace(relative, data, None) is not None

    def read_tagged(self, relative: str) -> Optional[Tagged]:
        """The object and its version tag (S3's ETag), or None when there is none."""

    def replace(self, relative: str, data: bytes, tag: Optional[str]) -> Optional[str]:
        """Write the object only if it is still at version `tag` (None: only if it does not exist):
        its new tag, or None when it changed meanwhile (another writer came first)."""

    def conditional_writes(self) -> bool:
        """Whether this store honours `create` and `replace`'s conditions (some S3-compatible stores
        ignore If-None-Match / If-Match and overwrite): found by a probe, once per Place."""
        return True

    def check_writable(self) -> None:
        """Write and delete a probe object; a StorageError says why the place cannot take output."""
        probe = f"{PROBE_DIR}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.write(probe, b"wds-encode write probe\n")
        self.delete([probe])

    def close(self) -> None:
        """Wait for background uploads (raising the first failure) and release resources."""


@dataclass(frozen=True)
class Tagged:
    """An object's bytes and its version tag, for a conditional write back (`Place.replace`)."""

    data: bytes
    tag: str


class ObjectWriter:
    """A stream into one object of a Place; nothing is visible until `commit`."""

    def write(self, data: bytes) -> int: ...
    def finish(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


# The backends import the interface above from this package, so they come last.
from .local import LocalObjectWriter, LocalPlace  # noqa: E402
from .s3 import S3ObjectWriter, S3Place, list_tar_objects, make_client, probe_endpoint  # noqa: E402
from .stream import S3ReadStream, open_s3  # noqa: E402

__all__ = [
    "PARTIAL", "PROBE_DIR", "S3_SCHEME", "FULL_CODES", "FULL_ERRNOS",
    "StorageError", "StorageFull", "redact_url", "redact", "is_s3", "split_s3", "join", "S3Options",
    "s3_error", "local_error", "Storage", "Place", "ObjectWriter", "Tagged",
    "LocalPlace", "LocalObjectWriter", "S3Place", "S3ObjectWriter", "S3ReadStream",
]
